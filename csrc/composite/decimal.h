#pragma once

// Numbers in messages with every digit that tells them apart: an out-of-range 1.0000001 must not
// print as the in-range 1 that a stream's default six digits make of it.
#include <cstdlib>
#include <iomanip>
#include <limits>
#include <sstream>
#include <string>

namespace torchmha::composite {

// The shortest decimal that reads back as `value`, as Python's repr prints it ("nan", "inf").
inline std::string shortest_decimal(double value) {
  constexpr int kMaxDigits = std::numeric_limits<double>::max_digits10;
  std::ostringstream text;
  for (int digits = 1; digits <= kMaxDigits; ++digits) {
    text.str("");
    text << std::setprecision(digits) << value;
    if (digits == kMaxDigits || std::strtod(text.str().c_str(), nullptr) == value) {
      break;
    }
  }
  return text.str();
}

}  // namespace torchmha::composite
