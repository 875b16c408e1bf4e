// Catch2 as Debian 12 ships it (2.13, one header) and as Ubuntu 24.04 ships it (3.x, split headers).
#pragma once

#if __has_include(<catch2/catch_test_macros.hpp>)
#include <catch2/catch_approx.hpp>
#include <catch2/catch_session.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
using Catch::Approx;  // Catch2 2.x has Approx in the global namespace; the tests use it unqualified
#else
#include <catch2/catch.hpp>
#endif
