// Where a layer's time goes at small batches, on GPU machines without Nsight Systems. Built with
// -DQMOE_CUDA_TIMELINE=ON, thread 0 of every block of the routing, SM80-family FC and combine kernels
// reads %globaltimer at the points below and keeps the earliest and the latest over blocks;
// qmoe_cuda_bench prints them for single replays of each case. Off by default: the marks compile to
// nothing. (The atomics cost a little where a launch has thousands of blocks: compare timelines
// with timelines, not with untimed runs.)
#pragma once

#include <cstdint>

namespace qmoe::cuda {

enum TimelinePoint : int {
  kTlRouteStart,     // routing kernel (route_group_kernel, or route_one_kernel at T = 1) entered
  kTlRouteSelected,  // the routing warp has chosen the token's experts (the last token's, T > 1)
  kTlRouteRouted,    // every token routed (before the grouping)
  kTlRouteEnd,       // grouping done
  kTlFc1Start, kTlFc1Waited, kTlFc1Staged, kTlFc1Looped, kTlFc1Reduced,  // fc1 (see fc_kernel)
  kTlFc2Start, kTlFc2Waited, kTlFc2Staged, kTlFc2Looped, kTlFc2Reduced,  // fc2
  kTlCombineStart, kTlCombineWaited, kTlCombineEnd,
  kTlPoints
};
const char* timeline_point_name(int point);
bool timeline_enabled();  // built with QMOE_CUDA_TIMELINE
void timeline_reset();
// first_last[p] = {earliest, latest} %globaltimer ns at point p; {UINT64_MAX, 0} where none was reached.
void timeline_read(uint64_t (*first_last)[2]);

}  // namespace qmoe::cuda
