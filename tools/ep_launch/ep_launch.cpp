// qmoe_ep_launch: runs G copies of a program, one per GPU, for expert-parallel tests and benchmarks.
//
//   qmoe_ep_launch [-n G] [--timeout SECONDS] -- PROGRAM [ARGS...]
//
// Each copy gets QMOE_EP_RANK (0..G-1), QMOE_EP_WORLD (G) and QMOE_EP_ID_FILE (a fresh file in a
// private temporary folder): rank 0 writes the NCCL unique id there, the others read it
// (qmoe::ep_comm_init_from_file, qmoe::ep_launch_env). NVLink multicast is switched off for every
// copy (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1): on shared
// machines it can put the host's GPUs out of service.
//
// When one copy fails, the others would wait forever in their next collective, so they get 30 s to
// finish and are then killed; the whole run is killed after --timeout (default 900 s). Exit status:
// 0 when every copy exited 0, else the first failure's status (128 + signal for a signal).
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

int usage() {
  std::fprintf(stderr, "usage: qmoe_ep_launch [-n G] [--timeout SECONDS] -- PROGRAM [ARGS...]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  int world = 2;
  double timeout_s = 900;
  int i = 1;
  for (; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--") {
      ++i;
      break;
    }
    if (a == "-n" && i + 1 < argc) world = std::atoi(argv[++i]);
    else if (a == "--timeout" && i + 1 < argc) timeout_s = std::atof(argv[++i]);
    else return usage();
  }
  if (i >= argc || world < 1 || world > 32) return usage();
  char dir_tmpl[] = "/tmp/qmoe-ep-XXXXXX";
  if (!mkdtemp(dir_tmpl)) {
    std::perror("qmoe_ep_launch: mkdtemp");
    return 2;
  }
  const std::string id_file = std::string(dir_tmpl) + "/nccl_id";
  std::fflush(stdout);
  std::fflush(stderr);
  std::vector<pid_t> pids;
  for (int r = 0; r < world; ++r) {
    const pid_t pid = fork();
    if (pid < 0) {
      std::perror("qmoe_ep_launch: fork");
      for (pid_t p : pids) kill(p, SIGKILL);
      return 2;
    }
    if (pid == 0) {
      setenv("QMOE_EP_RANK", std::to_string(r).c_str(), 1);
      setenv("QMOE_EP_WORLD", std::to_string(world).c_str(), 1);
      setenv("QMOE_EP_ID_FILE", id_file.c_str(), 1);
      setenv("NCCL_NVLS_ENABLE", "0", 1);
      setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1", 1);
      setenv("NVSHMEM_DISABLE_NVLS", "1", 1);
      execvp(argv[i], argv + i);
      std::perror("qmoe_ep_launch: exec");
      _exit(127);
    }
    pids.push_back(pid);
  }
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  auto first_fail = clock::time_point::max();
  int status_out = 0, alive = world;
  std::vector<bool> done(size_t(world), false);
  while (alive > 0) {
    bool reaped = false;
    for (int r = 0; r < world; ++r) {
      if (done[size_t(r)]) continue;
      int st = 0;
      const pid_t p = waitpid(pids[size_t(r)], &st, WNOHANG);
      if (p != pids[size_t(r)]) continue;
      done[size_t(r)] = true, --alive, reaped = true;
      const int code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
      if (code != 0) {
        std::fprintf(stderr, "qmoe_ep_launch: rank %d exited with status %d\n", r, code);
        if (status_out == 0) status_out = code, first_fail = clock::now();
      }
    }
    if (reaped) continue;
    const auto now = clock::now();
    const bool overdue = std::chrono::duration<double>(now - start).count() > timeout_s;
    const bool stranded = first_fail != clock::time_point::max() && now - first_fail > std::chrono::seconds(30);
    if (overdue || stranded) {
      std::fprintf(stderr, "qmoe_ep_launch: %s; killing the remaining ranks\n",
                   overdue ? "timeout" : "a rank failed and the others did not finish within 30 s");
      for (int r = 0; r < world; ++r)
        if (!done[size_t(r)]) kill(pids[size_t(r)], SIGKILL);
      if (status_out == 0) status_out = 124;
      first_fail = clock::time_point::max();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  unlink(id_file.c_str());
  rmdir(dir_tmpl);
  return status_out;
}
