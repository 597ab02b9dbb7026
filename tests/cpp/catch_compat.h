// One include for Catch2 v3 (catch2/catch_test_macros.hpp) and v2 (catch2/catch.hpp).
#pragma once

#if __has_include(<catch2/catch_test_macros.hpp>)
#include <catch2/catch_session.hpp>
#include <catch2/catch_test_macros.hpp>
#else
#include <catch2/catch.hpp>
#endif
