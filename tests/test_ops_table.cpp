// The op table's CPU rows (tests/op_table.h): every op × shape × weight dtype on the CPU backend
// against the plain-loop reference ops_ref, at 1, 2 and 3 threads. One test per op.
#include <set>

#include "op_table.h"

using namespace zi;

namespace {
class OpTableCpu : public ::testing::TestWithParam<std::string> {};
}  // namespace

TEST_P(OpTableCpu, MatchesReference) { optable::run_cpu(GetParam()); }

INSTANTIATE_TEST_SUITE_P(Ops, OpTableCpu, ::testing::ValuesIn(optable::op_names()), optable::test_name);

// The list of ops the tests are made from and the rows agree: every row's op is listed, and
// every listed op has rows.
TEST(OpTable, NamesMatchRows) {
  const std::vector<std::string> names = optable::op_names();
  std::set<std::string> seen;
  for (const optable::Row& r : optable::make_rows()) {
    EXPECT_NE(std::find(names.begin(), names.end(), r.op), names.end()) << r.op << " has rows but no test";
    seen.insert(r.op);
  }
  for (const std::string& n : names) EXPECT_TRUE(seen.count(n)) << n << " has no rows";
}
