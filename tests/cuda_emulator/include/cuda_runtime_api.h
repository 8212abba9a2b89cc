// CPU stand-in (tests/cuda_emulator): the runtime API the hbat CUDA sources use.
#pragma once

#include <cstddef>

#define CUDART_VERSION 13000

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
typedef struct CUstream_st* cudaStream_t;

namespace hbat_emu { extern int num_sms_value(); }

inline cudaError_t cudaGetDevice(int* device) { *device = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = hbat_emu::num_sms_value();
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
