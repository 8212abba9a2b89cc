// CPU stand-in (tests/cuda_emulator): see emu_core.h.
#pragma once
#include "emu_core.h"
