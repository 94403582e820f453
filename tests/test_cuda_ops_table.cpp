// The op table's GPU rows (tests/op_table.h): every op the GPU suite covered, in f32 and bf16
// activations, against the CPU backend on the same rounded inputs. Label gpu; skipped without
// a GPU. One test per op.
#include "backends/device.h"
#include "op_table.h"

using namespace zi;

namespace {
class OpTableGpu : public ::testing::TestWithParam<std::string> {};
}  // namespace

TEST_P(OpTableGpu, MatchesCpu) {
  if (!device::gpu_available()) GTEST_SKIP() << "no CUDA GPU: " << device::gpu_unavailable_reason();
  for (DType act : {DType::F32, DType::BF16}) optable::run_gpu(GetParam(), act);
}

INSTANTIATE_TEST_SUITE_P(Ops, OpTableGpu, ::testing::ValuesIn(optable::op_names()), optable::test_name);
