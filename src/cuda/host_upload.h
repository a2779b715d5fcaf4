// Host-to-device upload of pageable memory (prepack's raw weights) through two pinned chunks: the
// host copy into one chunk, split over a few worker threads, overlaps the DMA of the other. A plain
// cudaMemcpy from pageable memory stages through the driver's buffers with one thread: measured
// 7 GB/s on the H100 host here, against 45 GB/s through this uploader (docs/PERF-cuda.md, "Prepack").
//
// The pinned chunks and the workers are costly to set up (cudaHostAlloc of 2 x 16 MB took 12-20 ms
// there), so the cuda backend keeps one uploader for its lifetime and reuses it for every prepack.
// Where pinned memory cannot be had, the uploader copies from pageable memory directly (slower, same
// results).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <memory>

namespace qmoe::cuda {

class HostUploader {
 public:
  // Allocates the two pinned chunks (chunk_bytes each) and their events and starts the copy workers;
  // copies run on `stream`. chunk_bytes = 0, or a failed pinned allocation, selects direct copies
  // from pageable memory.
  HostUploader(cudaStream_t stream, size_t chunk_bytes = size_t(16) << 20);
  ~HostUploader();
  HostUploader(const HostUploader&) = delete;
  HostUploader& operator=(const HostUploader&) = delete;

  // Enqueues dst[0, n) = src[0, n) on the stream. `src` has been read when this returns; `dst` is
  // written in stream order (later work on the stream sees it). Throws qmoe::Error on CUDA errors.
  void copy(void* dst, const void* src, size_t n);

  // Whether copies go through the pinned chunks (false: direct pageable copies).
  bool staged() const { return pinned_[0] != nullptr; }

 private:
  class Workers;
  void release();

  cudaStream_t stream_;
  size_t chunk_;
  void* pinned_[2] = {nullptr, nullptr};
  cudaEvent_t done_[2] = {nullptr, nullptr};  // the DMA out of pinned_[i] has finished
  int next_ = 0;
  std::unique_ptr<Workers> workers_;
};

}  // namespace qmoe::cuda
