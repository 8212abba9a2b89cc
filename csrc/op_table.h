// Generated from hbat/ops/table.py by `python -m hbat.ops.table --write`: do not edit.
// The op table as X-macros: edit the table, then regenerate (tests/test_op_table.py fails while this
// file is out of date).
#pragma once

// HBAT_OPS(X): X(name, code, reduces, num_lists, num_vectors, num_scalars, schema)
#define HBAT_OPS(X) \
  X(squared_change, 0, 1, 2, 0, 0, "squared_change(Tensor[] params, Tensor[] refs) -> Tensor") \
  X(snapshot_, 1, 1, 2, 0, 0, "snapshot_(Tensor[] params, Tensor(a!)[] anchors) -> Tensor") \
  X(ewc_penalty_grad_, 2, 1, 3, 1, 0, "ewc_penalty_grad_(Tensor[] params, Tensor[] anchors, Tensor(a!)[] grads, Tensor coef) -> Tensor") \
  X(scaled_diff, 3, 0, 3, 1, 0, "scaled_diff(Tensor[] params, Tensor[] anchors, Tensor coef) -> Tensor[]") \
  X(lerp_, 4, 0, 3, 1, 0, "lerp_(Tensor(a!)[] dst, Tensor[] a, Tensor[] b, Tensor weights) -> ()") \
  X(adamw_ewc_step_, 5, 1, 5, 5, 3, "adamw_ewc_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, Tensor[] anchors, Tensor coef, Tensor lr, Tensor weight_decay, Tensor bias_correction1, Tensor bias_correction2, float beta1, float beta2, float eps) -> Tensor") \

// HBAT_OP_LISTS(X): X(op, index, name, role, dtype)
//   role: kRead, kUpdate (read, then written in place), kWrite (written in place, never read),
//         kReturn (new tensors the op returns); see hbat::Role
//   dtype: -1 float32, bfloat16 or float16; -2 float32 only; i >= 0 the dtype of list i
#define HBAT_OP_LISTS(X) \
  X(squared_change, 0, params, kRead, -1) \
  X(squared_change, 1, refs, kRead, -1) \
  X(snapshot_, 0, params, kRead, -1) \
  X(snapshot_, 1, anchors, kUpdate, -1) \
  X(ewc_penalty_grad_, 0, params, kRead, -1) \
  X(ewc_penalty_grad_, 1, anchors, kRead, -1) \
  X(ewc_penalty_grad_, 2, grads, kUpdate, -1) \
  X(scaled_diff, 0, params, kRead, -1) \
  X(scaled_diff, 1, anchors, kRead, -1) \
  X(scaled_diff, 2, out, kReturn, 0) \
  X(lerp_, 0, dst, kWrite, -1) \
  X(lerp_, 1, a, kRead, -1) \
  X(lerp_, 2, b, kRead, -1) \
  X(adamw_ewc_step_, 0, params, kUpdate, -1) \
  X(adamw_ewc_step_, 1, grads, kRead, 0) \
  X(adamw_ewc_step_, 2, exp_avg, kUpdate, -2) \
  X(adamw_ewc_step_, 3, exp_avg_sq, kUpdate, -2) \
  X(adamw_ewc_step_, 4, anchors, kRead, -1) \

#define HBAT_NUM_OPS 6
#define HBAT_MAX_LISTS 5
#define HBAT_MAX_VECTORS 5
#define HBAT_MAX_SCALARS 3
