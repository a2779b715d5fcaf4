// Expert-parallel QMoE over NCCL (include/qmoe/cuda_ep.h, docs/MULTIGPU.md).
//
// This file owns the exchange: buffers, the order of kernels and NCCL calls on the caller's stream,
// the host read of the all-to-all sizes, and tune(). The expert math is the CUDA backend's own, run
// on this rank's slice through cuda_run_slice() (cuda_slice.h), so every FC path the backend has
// serves expert parallelism too.
//
//   allreduce: run_slice(all T tokens, routing over all E) -> fp32 partial [T, H]
//              -> ncclAllReduce(sum) -> round to T                              (no host sync)
//   alltoall:  route own slice of S = ceil(T/G) tokens -> plan (dest ranks per token, positions)
//              -> allgather send counts -> host reads the G x G matrix (sync) -> pack rows + routes
//              -> grouped send/recv -> count routes -> run_slice(received rows) -> fp32 partials
//              -> grouped send/recv back -> sum per token (ranks ascending), round to T
//              -> allgather the output slices
#include <cuda_runtime.h>
#include <nccl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <thread>

#include "cuda_kernels.h"
#include "cuda_slice.h"
#include "ep_kernels.h"
#include "qmoe/checkpoint.h"
#include "qmoe/cuda_backend.h"
#include "qmoe/cuda_ep.h"
#include "qmoe/error.h"
#include "qmoe/routing.h"
#include "qmoe/tensor.h"

namespace qmoe {

namespace {

void cu_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw Error(std::string("expert parallel: ") + what + ": " + cudaGetErrorString(e));
  }
}
void nccl_check(ncclResult_t r, const char* what) {
  if (r != ncclSuccess && r != ncclInProgress)
    throw Error(std::string("expert parallel: ") + what + ": " + ncclGetErrorString(r));
}
#define EP_CU(call) cu_check((call), #call)
#define EP_NCCL(call) nccl_check((call), #call)

// An owned device allocation (grow-only use).
class DevBuf {
 public:
  DevBuf() = default;
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  ~DevBuf() { release(); }
  void ensure(size_t bytes) {
    if (bytes <= bytes_) return;
    release();
    EP_CU(cudaMalloc(&p_, bytes));
    bytes_ = bytes;
  }
  void release() {
    if (p_) cudaFree(p_);
    p_ = nullptr, bytes_ = 0;
  }
  template <class T = void> T* as() const { return static_cast<T*>(p_); }
  uint8_t* bytes_ptr() const { return static_cast<uint8_t*>(p_); }
  size_t bytes() const { return bytes_; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

cuda::Elt elt_of(DType t) {
  switch (t) {
    case DType::f32: return cuda::Elt::f32;
    case DType::f16: return cuda::Elt::f16;
    case DType::bf16: return cuda::Elt::bf16;
    default: throw Error("expert parallel: activation dtype must be a float type");
  }
}

}  // namespace

struct ExpertParallelLayer::Impl {
  MoeSpec spec;
  EpOptions opt;
  ncclComm_t comm = nullptr;
  cudaStream_t st = nullptr;
  int rank = 0, world = 1, device = 0;
  ExpertRange range;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<PackedExperts> slice;
  EpSchemeTable table;

  int64_t rows_cap = -1;
  // allreduce
  DevBuf partial;  // [rows, H] fp32
  // alltoall
  DevBuf counts;                       // [E] route counts of received rows (zero between runs)
  DevBuf route_counts;                 // [E] scratch for the routing kernel's counters
  DevBuf r_e, r_w;                     // [S * k] routes of this rank's slice
  DevBuf send_pos, send_counts, cmat;  // [S * G], [G], [G * G]
  DevBuf send_x, send_e, send_w;       // [S * G] rows
  DevBuf recv_x, recv_e, recv_w;       // [G * S] rows
  DevBuf ret, back;                    // fp32 partial rows: computed here / returned to this rank
  DevBuf gather;                       // [G * S, H] output slices when rows % G != 0
  int* cmat_host = nullptr;            // pinned [G * G]

  ~Impl() {
    if (cmat_host) cudaFreeHost(cmat_host);
  }

  size_t at() const { return dtype_size(spec.act_dtype); }
  void set_device() const { EP_CU(cudaSetDevice(device)); }

  void reserve(int64_t rows) {
    if (rows <= rows_cap) return;
    set_device();
    EP_CU(cudaStreamSynchronize(st));  // buffers may be in use by queued work
    const int64_t R = std::max<int64_t>(rows, 1), G = world, k = spec.k, H = spec.hidden, E = spec.num_experts;
    const int64_t S = (R + G - 1) / G, GS = G * S;  // GS >= R
    const size_t a = at();
    cuda_reserve_workspace(*backend, *slice, GS);
    partial.ensure(size_t(R * H) * 4);
    if (!counts.bytes()) {
      counts.ensure(size_t(E) * 4);
      EP_CU(cudaMemsetAsync(counts.as(), 0, counts.bytes(), st));  // in order with the routing on st
    }
    route_counts.ensure(size_t(E) * 4);
    r_e.ensure(size_t(S * k) * 4);
    r_w.ensure(size_t(S * k) * 4);
    send_pos.ensure(size_t(S * G) * 4);
    send_counts.ensure(size_t(G) * 4);
    cmat.ensure(size_t(G * G) * 4);
    send_x.ensure(size_t(GS * H) * a);
    send_e.ensure(size_t(GS * k) * 4);
    send_w.ensure(size_t(GS * k) * 4);
    recv_x.ensure(size_t(GS * H) * a);
    recv_e.ensure(size_t(GS * k) * 4);
    recv_w.ensure(size_t(GS * k) * 4);
    ret.ensure(size_t(GS * H) * 4);
    back.ensure(size_t(GS * H) * 4);
    gather.ensure(size_t(GS * H) * a);
    if (!cmat_host) EP_CU(cudaMallocHost(&cmat_host, size_t(G * G) * 4));
    rows_cap = rows;
  }

  size_t workspace_bytes() const {
    size_t n = 0;
    for (const DevBuf* b : {&partial, &counts, &route_counts, &r_e, &r_w, &send_pos, &send_counts, &cmat, &send_x,
                            &send_e, &send_w, &recv_x, &recv_e, &recv_w, &ret, &back, &gather})
      n += b->bytes();
    return n;
  }

  void run_allreduce(const EpRunArgs& a) {
    CudaSliceRunArgs sa;
    sa.input = a.input;
    sa.router_probs = a.router_probs;
    sa.router_weights = a.router_weights;
    sa.partial = partial.as<float>();
    sa.rows = a.rows;
    sa.stream = st;
    cuda_run_slice(*backend, *slice, sa);
    const size_t n = size_t(a.rows * spec.hidden);
    EP_NCCL(ncclAllReduce(partial.as(), partial.as(), n, ncclFloat32, ncclSum, comm, st));
    cuda::launch_ep_convert(partial.as<float>(), a.output, elt_of(spec.act_dtype), int64_t(n), st);
    EP_CU(cudaGetLastError());
  }

  void run_alltoall(const EpRunArgs& a) {
    const int G = world, k = int(spec.k);
    const int64_t H = spec.hidden, E = spec.num_experts;
    const size_t at_ = at(), rb = size_t(H) * at_;
    const TokenSlice sl = token_slice_for_rank(a.rows, rank, world);
    const int64_t S = sl.stride, n = sl.count;
    const cuda::Elt ae = elt_of(spec.act_dtype);

    // 1. Route this rank's tokens over all E experts (the same kernel the single-GPU path uses).
    if (n > 0) {
      EP_CU(cudaMemsetAsync(route_counts.as(), 0, route_counts.bytes(), st));
      cuda::RouteArgs ra;
      ra.logits = static_cast<const uint8_t*>(a.router_probs) + size_t(sl.first * E) * at_;
      ra.router_weights =
          a.router_weights ? static_cast<const uint8_t*>(a.router_weights) + size_t(sl.first * E) * at_ : nullptr;
      ra.elt = ae;
      ra.T = n;
      ra.E = int(E);
      ra.k = k;
      ra.normalize = spec.normalize_routing_weights;
      ra.sparse_mixer = spec.use_sparse_mixer;
      ra.jitter_eps = kSparseMixerJitterEps;
      ra.route_e = r_e.as<int>();
      ra.route_w = r_w.as<float>();
      ra.counts = route_counts.as<int>();
      cuda::launch_route(ra, st);
    }
    // 2. Plan: which ranks each token goes to, and where in the send buffer.
    cuda::EpPlanArgs pa;
    pa.route_e = r_e.as<int>();
    pa.n = n;
    pa.k = k;
    pa.E = E;
    pa.world = G;
    pa.send_pos = send_pos.as<int>();
    pa.send_counts = send_counts.as<int>();
    cuda::launch_ep_plan(pa, st);
    // 3. Everyone learns every send count; the host needs them to size the grouped send/recv.
    EP_NCCL(ncclAllGather(send_counts.as(), cmat.as(), size_t(G), ncclInt32, comm, st));
    EP_CU(cudaMemcpyAsync(cmat_host, cmat.as(), size_t(G * G) * 4, cudaMemcpyDeviceToHost, st));
    EP_CU(cudaStreamSynchronize(st));
    std::vector<int64_t> send_to(G), recv_from(G), soff(G + 1, 0), roff(G + 1, 0);
    for (int g = 0; g < G; ++g) {
      send_to[g] = cmat_host[rank * G + g];
      recv_from[g] = cmat_host[g * G + rank];
      soff[g + 1] = soff[g] + send_to[g];
      roff[g + 1] = roff[g] + recv_from[g];
    }
    const int64_t R = roff[G];
    if (soff[G] > G * S || R > G * S)
      throw Error("expert parallel: exchange sizes exceed the workspace (" + std::to_string(soff[G]) + " sent, " +
                  std::to_string(R) + " received, room for " + std::to_string(G * S) + ")");
    // 4. Pack each token row and its routes once per destination rank, then exchange.
    cuda::EpPackArgs pk;
    pk.x = static_cast<const uint8_t*>(a.input) + size_t(sl.first) * rb;
    pk.row_bytes = int64_t(rb);
    pk.route_e = r_e.as<int>();
    pk.route_w = r_w.as<float>();
    pk.n = n;
    pk.k = k;
    pk.world = G;
    pk.send_pos = send_pos.as<int>();
    pk.send_x = send_x.bytes_ptr();
    pk.send_e = send_e.as<int>();
    pk.send_w = send_w.as<float>();
    cuda::launch_ep_pack(pk, st);
    EP_NCCL(ncclGroupStart());
    for (int g = 0; g < G; ++g) {
      if (send_to[g]) {
        EP_NCCL(ncclSend(send_x.bytes_ptr() + size_t(soff[g]) * rb, size_t(send_to[g]) * rb, ncclUint8, g, comm, st));
        EP_NCCL(ncclSend(send_e.as<int>() + soff[g] * k, size_t(send_to[g] * k), ncclInt32, g, comm, st));
        EP_NCCL(ncclSend(send_w.as<float>() + soff[g] * k, size_t(send_to[g] * k), ncclFloat32, g, comm, st));
      }
      if (recv_from[g]) {
        EP_NCCL(ncclRecv(recv_x.bytes_ptr() + size_t(roff[g]) * rb, size_t(recv_from[g]) * rb, ncclUint8, g, comm, st));
        EP_NCCL(ncclRecv(recv_e.as<int>() + roff[g] * k, size_t(recv_from[g] * k), ncclInt32, g, comm, st));
        EP_NCCL(ncclRecv(recv_w.as<float>() + roff[g] * k, size_t(recv_from[g] * k), ncclFloat32, g, comm, st));
      }
    }
    EP_NCCL(ncclGroupEnd());
    // 5. This rank's experts on every row it received (all routes travel with the row; grouping keeps
    //    this rank's).
    if (R > 0) {
      cuda::launch_ep_count(recv_e.as<int>(), R * k, counts.as<int>(), st);
      CudaSliceRunArgs sa;
      sa.input = recv_x.as();
      sa.route_e = recv_e.as<int>();
      sa.route_w = recv_w.as<float>();
      sa.counts = counts.as<int>();
      sa.partial = ret.as<float>();
      sa.rows = R;
      sa.stream = st;
      cuda_run_slice(*backend, *slice, sa);
    }
    // 6. Partial rows back to their sources.
    EP_NCCL(ncclGroupStart());
    for (int g = 0; g < G; ++g) {
      if (recv_from[g])
        EP_NCCL(ncclSend(ret.as<float>() + roff[g] * H, size_t(recv_from[g] * H), ncclFloat32, g, comm, st));
      if (send_to[g]) EP_NCCL(ncclRecv(back.as<float>() + soff[g] * H, size_t(send_to[g] * H), ncclFloat32, g, comm, st));
    }
    EP_NCCL(ncclGroupEnd());
    // 7. Sum each token's partials (ranks ascending), round once, and replicate the output.
    const bool in_place = a.rows % G == 0;
    uint8_t* mine = in_place ? static_cast<uint8_t*>(a.output) + size_t(sl.first) * rb
                             : gather.bytes_ptr() + size_t(rank * S) * rb;
    cuda::EpGatherSumArgs gs;
    gs.back = back.as<float>();
    gs.send_pos = send_pos.as<int>();
    gs.n = n;
    gs.H = H;
    gs.world = G;
    gs.out = mine;
    gs.out_elt = ae;
    cuda::launch_ep_gather_sum(gs, st);
    if (in_place) {
      EP_NCCL(ncclAllGather(mine, a.output, size_t(S) * rb, ncclUint8, comm, st));
    } else {
      EP_NCCL(ncclAllGather(mine, gather.as(), size_t(S) * rb, ncclUint8, comm, st));
      EP_CU(cudaMemcpyAsync(a.output, gather.as(), size_t(a.rows) * rb, cudaMemcpyDeviceToDevice, st));
    }
    EP_CU(cudaGetLastError());
  }
};

ExpertParallelLayer::ExpertParallelLayer(const MoeSpec& spec, const RawExperts& raw, void* nccl_comm,
                                         void* cuda_stream, const EpOptions& opt)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  if (!nccl_comm) throw Error("expert parallel: no NCCL communicator given");
  spec.validate();
  m.spec = spec;
  m.opt = opt;
  m.comm = static_cast<ncclComm_t>(nccl_comm);
  m.st = static_cast<cudaStream_t>(cuda_stream);
  EP_NCCL(ncclCommUserRank(m.comm, &m.rank));
  EP_NCCL(ncclCommCount(m.comm, &m.world));
  EP_NCCL(ncclCommCuDevice(m.comm, &m.device));
  m.range = expert_range_for_rank(spec.num_experts, m.rank, m.world);
  RawExperts local = slice_experts(spec, raw, m.range);
  CudaBackendOptions bo;
  bo.device = m.device;
  m.backend = make_cuda_backend(bo);
  m.slice = cuda_prepack_slice(*m.backend, spec, std::move(local), m.range);
}

ExpertParallelLayer::~ExpertParallelLayer() {
  if (impl_) {
    cudaSetDevice(impl_->device);
    cudaStreamSynchronize(impl_->st);  // queued work may still read the buffers
  }
}

std::unique_ptr<ExpertParallelLayer> ExpertParallelLayer::from_raw_safetensors(const std::string& path,
                                                                               void* nccl_comm, void* cuda_stream,
                                                                               const EpOptions& opt) {
  const RawLayer layer = read_raw_safetensors(path);  // memory-mapped: only what is touched is read
  return std::make_unique<ExpertParallelLayer>(layer.spec, layer.raw, nccl_comm, cuda_stream, opt);
}

void ExpertParallelLayer::reserve(int64_t rows) {
  if (rows < 0) throw Error("expert parallel: negative row count " + std::to_string(rows));
  impl_->reserve(rows);
}

EpScheme ExpertParallelLayer::scheme_for(int64_t rows) const {
  if (impl_->opt.scheme != EpScheme::automatic) return impl_->opt.scheme;
  return impl_->table.choose(rows, EpScheme::allreduce);
}

void ExpertParallelLayer::run_device(const EpRunArgs& args) { run_device(args, scheme_for(args.rows)); }

void ExpertParallelLayer::run_device(const EpRunArgs& args, EpScheme scheme) {
  Impl& m = *impl_;
  if (args.rows < 0) throw Error("expert parallel: negative row count " + std::to_string(args.rows));
  if (args.rows == 0) return;
  if (!args.input || !args.router_probs || !args.output) throw Error("expert parallel: null input, logits or output");
  if (scheme == EpScheme::automatic) scheme = scheme_for(args.rows);
  m.set_device();
  m.reserve(args.rows);
  if (scheme == EpScheme::allreduce) m.run_allreduce(args);
  else m.run_alltoall(args);
}

std::vector<ExpertParallelLayer::TuneResult> ExpertParallelLayer::tune(const std::vector<int64_t>& rows_list,
                                                                       int iters) {
  Impl& m = *impl_;
  m.set_device();
  iters = std::max(iters, 1);
  std::vector<TuneResult> out;
  const int64_t maxr = rows_list.empty() ? 0 : *std::max_element(rows_list.begin(), rows_list.end());
  if (maxr <= 0) return out;
  m.reserve(maxr);
  // Random inputs, the same on every rank (fixed seed): uniform routing, activations in (-1, 1).
  const MoeSpec& s = m.spec;
  Tensor x(s.act_dtype, {maxr, s.hidden}), lg(s.act_dtype, {maxr, s.num_experts});
  std::mt19937_64 r(0x7e57);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (int64_t i = 0; i < x.numel(); ++i) store_from_float(s.act_dtype, x.data(), i, u(r));
  for (int64_t i = 0; i < lg.numel(); ++i) store_from_float(s.act_dtype, lg.data(), i, 3.f * u(r));
  DevBuf dx, dl, dout, dt;
  dx.ensure(x.nbytes());
  dl.ensure(lg.nbytes());
  dout.ensure(x.nbytes());
  dt.ensure(2 * sizeof(float));
  EP_CU(cudaMemcpy(dx.as(), x.data(), x.nbytes(), cudaMemcpyHostToDevice));
  EP_CU(cudaMemcpy(dl.as(), lg.data(), lg.nbytes(), cudaMemcpyHostToDevice));
  EP_CU(cudaDeviceSynchronize());  // pageable copies may return before their DMA; runs use a non-blocking stream
  cudaEvent_t e0, e1;
  EP_CU(cudaEventCreate(&e0));
  EP_CU(cudaEventCreate(&e1));
  for (int64_t rows : rows_list) {
    if (rows <= 0) continue;
    EpRunArgs a;
    a.input = dx.as();
    a.router_probs = dl.as();
    a.output = dout.as();
    a.rows = rows;
    float t[2];
    for (int sc = 0; sc < 2; ++sc) {
      const EpScheme scheme = sc == 0 ? EpScheme::allreduce : EpScheme::alltoall;
      for (int i = 0; i < 3; ++i) run_device(a, scheme);
      EP_CU(cudaEventRecord(e0, m.st));
      for (int i = 0; i < iters; ++i) run_device(a, scheme);
      EP_CU(cudaEventRecord(e1, m.st));
      EP_CU(cudaEventSynchronize(e1));
      float ms = 0;
      EP_CU(cudaEventElapsedTime(&ms, e0, e1));
      t[sc] = ms * 1000.f / float(iters);
    }
    // The slower rank decides: every rank gets the same two numbers, hence the same choice.
    EP_CU(cudaMemcpyAsync(dt.as(), t, sizeof t, cudaMemcpyHostToDevice, m.st));
    EP_NCCL(ncclAllReduce(dt.as(), dt.as(), 2, ncclFloat32, ncclMax, m.comm, m.st));
    EP_CU(cudaMemcpyAsync(t, dt.as(), sizeof t, cudaMemcpyDeviceToHost, m.st));
    EP_CU(cudaStreamSynchronize(m.st));
    m.table.set(rows, t[1] < t[0] ? EpScheme::alltoall : EpScheme::allreduce);
    out.push_back({rows, double(t[0]), double(t[1])});
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return out;
}

const EpSchemeTable& ExpertParallelLayer::scheme_table() const { return impl_->table; }
int ExpertParallelLayer::rank() const { return impl_->rank; }
int ExpertParallelLayer::world() const { return impl_->world; }
int ExpertParallelLayer::device() const { return impl_->device; }
const MoeSpec& ExpertParallelLayer::spec() const { return impl_->spec; }
ExpertRange ExpertParallelLayer::experts() const { return impl_->range; }
size_t ExpertParallelLayer::weight_bytes() const { return impl_->slice->resident_bytes(); }
size_t ExpertParallelLayer::workspace_bytes() const { return impl_->workspace_bytes(); }

// ---- communicators for programs without one ----

void* ep_comm_init_from_file(const std::string& id_file, int rank, int world, int device, double timeout_s) {
  if (world < 1 || rank < 0 || rank >= world)
    throw Error("ep_comm_init_from_file: rank " + std::to_string(rank) + " / world " + std::to_string(world));
  EP_CU(cudaSetDevice(device));
  ncclUniqueId id;
  if (rank == 0) {
    EP_NCCL(ncclGetUniqueId(&id));
    const std::string tmp = id_file + ".tmp." + std::to_string(getpid());
    {
      std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
      f.write(reinterpret_cast<const char*>(&id), sizeof id);
      if (!f) throw Error("ep_comm_init_from_file: cannot write " + tmp);
    }
    if (std::rename(tmp.c_str(), id_file.c_str()) != 0) throw Error("ep_comm_init_from_file: cannot rename to " + id_file);
  } else {
    const auto t0 = std::chrono::steady_clock::now();
    for (;;) {
      std::ifstream f(id_file, std::ios::binary);
      if (f && f.read(reinterpret_cast<char*>(&id), sizeof id) && f.gcount() == sizeof id) break;
      if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > timeout_s)
        throw Error("ep_comm_init_from_file: rank " + std::to_string(rank) + " found no NCCL id in " + id_file +
                    " after " + std::to_string(timeout_s) + " s");
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  ncclComm_t comm = nullptr;
  EP_NCCL(ncclCommInitRank(&comm, world, id, rank));
  return comm;
}

void ep_comm_destroy(void* nccl_comm) {
  if (nccl_comm) ncclCommDestroy(static_cast<ncclComm_t>(nccl_comm));
}

std::optional<EpLaunchEnv> ep_launch_env() {
  const char* r = std::getenv("QMOE_EP_RANK");
  const char* w = std::getenv("QMOE_EP_WORLD");
  const char* f = std::getenv("QMOE_EP_ID_FILE");
  if (!r || !w || !f) return std::nullopt;
  EpLaunchEnv e;
  char* end = nullptr;
  e.rank = int(std::strtol(r, &end, 10));
  if (*end) throw Error(std::string("QMOE_EP_RANK is not an integer: ") + r);
  e.world = int(std::strtol(w, &end, 10));
  if (*end) throw Error(std::string("QMOE_EP_WORLD is not an integer: ") + w);
  if (e.world < 1 || e.rank < 0 || e.rank >= e.world)
    throw Error("QMOE_EP_RANK / QMOE_EP_WORLD out of range: " + std::string(r) + " / " + w);
  e.id_file = f;
  return e;
}

}  // namespace qmoe
