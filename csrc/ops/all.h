// Generated from hbat/ops/table.py by `python -m hbat.ops.table --write`: do not edit.
// The math of every op of the table (OpMath<Op::name>, one header per op).
#pragma once

#include "ops/squared_change.h"
#include "ops/snapshot.h"
#include "ops/ewc_penalty_grad.h"
#include "ops/scaled_diff.h"
#include "ops/lerp.h"
#include "ops/adamw_ewc_step.h"
