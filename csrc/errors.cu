#include "melama_kernels.h"

extern "C" const char* melama_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}
