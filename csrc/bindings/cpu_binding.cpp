// The CPU implementations register themselves for the CPU dispatch key in csrc/cpu/multi_tensor_cpu.cpp;
// this file is kept so the extension's source list stays stable.
