#pragma once

// Symbol visibility for libtorchmha (the library is built with default visibility on Linux).
#if defined(_WIN32)
#if defined(TORCHMHA_BUILDING_LIBRARY)
#define TORCHMHA_API __declspec(dllexport)
#else
#define TORCHMHA_API __declspec(dllimport)
#endif
#else
#define TORCHMHA_API __attribute__((visibility("default")))
#endif
