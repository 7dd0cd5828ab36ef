#pragma once

// Shared helpers for the GoogleTest suite.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

namespace torchmha::testing {

// Asserts that `fn` throws c10::Error whose message contains every one of `parts`.
inline void expect_error_containing(const std::function<void()>& fn,
                                    const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "expected a c10::Error";
  } catch (const c10::Error& error) {
    const std::string message = error.what_without_backtrace();
    for (const auto& part : parts) {
      EXPECT_NE(message.find(part), std::string::npos) << "message lacks \"" << part << "\":\n"
                                                       << message;
    }
  }
}

// Like expect_error_containing, and the error is a c10::ValueError (ValueError in Python).
inline void expect_value_error_containing(const std::function<void()>& fn,
                                          const std::vector<std::string>& parts) {
  expect_error_containing(
      [&] {
        try {
          fn();
        } catch (const c10::ValueError&) {
          throw;
        } catch (const c10::Error& error) {
          ADD_FAILURE() << "expected a c10::ValueError, got another c10::Error:\n"
                        << error.what_without_backtrace();
          throw;
        }
      },
      parts);
}

inline void expect_close(const torch::Tensor& actual, const torch::Tensor& expected,
                         double tolerance) {
  ASSERT_EQ(actual.sizes(), expected.sizes());
  EXPECT_LE((actual - expected).abs().max().item<double>(), tolerance);
}

}  // namespace torchmha::testing
