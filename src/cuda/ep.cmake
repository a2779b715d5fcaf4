# Expert parallelism (issue 8, docs/MULTIGPU.md): included from src/cuda/CMakeLists.txt, so only
# when QMOE_CUDA is on. ep_kernels.cu is always part of the CUDA backend (its expert-slice path uses
# the partial combine). With NCCL: cuda_ep.cpp and QMOE_HAVE_NCCL, the launcher, the 2-GPU test
# program and the benchmark.
#
# Where NCCL comes from, first hit wins (header and library must come from the same place, or the
# API version compiled against could differ from the one loaded):
#   1. QMOE_NCCL_ROOT (a folder with include/nccl.h and lib/libnccl.so[.2]);
#   2. the pip package nvidia-nccl-cu13 / -cu12 of the Python found on PATH (the GPU machines);
#   3. the CUDA toolkit (/usr/local/cuda-13.0 ships nccl.h and lib/libnccl.so here).
# pip's package has only libnccl.so.2 (no libnccl.so link), so the library is linked by full path;
# its folder goes into the build RPATH.
add_library(qmoe_ep_kernels OBJECT ep_kernels.cu)
set_target_properties(qmoe_ep_kernels PROPERTIES CUDA_ARCHITECTURES OFF POSITION_INDEPENDENT_CODE ON)
target_include_directories(qmoe_ep_kernels PRIVATE
  ${PROJECT_SOURCE_DIR}/include ${PROJECT_SOURCE_DIR}/src ${CMAKE_CURRENT_SOURCE_DIR})
target_compile_options(qmoe_ep_kernels PRIVATE ${QMOE_CUDA_GENCODE} -lineinfo)
target_link_libraries(qmoe_ep_kernels PRIVATE CUDA::cudart)
target_sources(qmoe PRIVATE $<TARGET_OBJECTS:qmoe_ep_kernels>)

option(QMOE_NCCL "Build expert parallelism over NCCL (needs nccl.h and libnccl)" ON)
set(QMOE_NCCL_ROOT "" CACHE PATH "Folder holding include/nccl.h and lib/libnccl.so* (optional)")
if(NOT QMOE_NCCL)
  return()
endif()

set(_qmoe_nccl_roots)
if(QMOE_NCCL_ROOT)
  list(APPEND _qmoe_nccl_roots "${QMOE_NCCL_ROOT}")
endif()
find_program(_qmoe_python3 python3)
if(_qmoe_python3)
  execute_process(
    COMMAND ${_qmoe_python3} -c "import nvidia.nccl as m; print(list(m.__path__)[0])"
    OUTPUT_VARIABLE _qmoe_pip_nccl OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _qmoe_pip_rc)
  if(_qmoe_pip_rc EQUAL 0 AND _qmoe_pip_nccl)
    list(APPEND _qmoe_nccl_roots "${_qmoe_pip_nccl}")
  endif()
endif()
get_filename_component(_qmoe_cuda_root "${CUDAToolkit_BIN_DIR}" DIRECTORY)
list(APPEND _qmoe_nccl_roots "${_qmoe_cuda_root}" "${CUDAToolkit_LIBRARY_ROOT}")

set(QMOE_NCCL_INCLUDE_DIR "")
set(QMOE_NCCL_LIBRARY "")
foreach(root IN LISTS _qmoe_nccl_roots)
  if(EXISTS "${root}/include/nccl.h")
    foreach(libdir lib lib64 targets/x86_64-linux/lib targets/sbsa-linux/lib)
      foreach(name libnccl.so libnccl.so.2)
        if(NOT QMOE_NCCL_LIBRARY AND EXISTS "${root}/${libdir}/${name}")
          set(QMOE_NCCL_INCLUDE_DIR "${root}/include")
          set(QMOE_NCCL_LIBRARY "${root}/${libdir}/${name}")
        endif()
      endforeach()
    endforeach()
  endif()
  if(QMOE_NCCL_LIBRARY)
    break()
  endif()
endforeach()
if(NOT QMOE_NCCL_LIBRARY)
  message(STATUS "qmoe: NCCL not found (looked in: ${_qmoe_nccl_roots}); expert parallelism is not built")
  return()
endif()
message(STATUS "qmoe: NCCL ${QMOE_NCCL_INCLUDE_DIR}/nccl.h, ${QMOE_NCCL_LIBRARY}")

add_library(qmoe_ep_objs OBJECT cuda_ep.cpp)
set_target_properties(qmoe_ep_objs PROPERTIES POSITION_INDEPENDENT_CODE ON)
target_include_directories(qmoe_ep_objs PRIVATE
  ${PROJECT_SOURCE_DIR}/include ${PROJECT_SOURCE_DIR}/src ${CMAKE_CURRENT_SOURCE_DIR} ${QMOE_NCCL_INCLUDE_DIR})
target_compile_options(qmoe_ep_objs PRIVATE -Wall -Wextra)
target_link_libraries(qmoe_ep_objs PRIVATE CUDA::cudart)
target_sources(qmoe PRIVATE $<TARGET_OBJECTS:qmoe_ep_objs>)
target_link_libraries(qmoe PUBLIC ${QMOE_NCCL_LIBRARY})
target_compile_definitions(qmoe PUBLIC QMOE_HAVE_NCCL=1)

# The launcher is plain C++ (fork/exec); it needs neither CUDA nor NCCL but is only useful with them.
add_executable(qmoe_ep_launch ${PROJECT_SOURCE_DIR}/tools/ep_launch/ep_launch.cpp)
target_compile_options(qmoe_ep_launch PRIVATE -Wall -Wextra)

if(QMOE_CUDA_TESTS)
  add_executable(qmoe_ep_tests ${PROJECT_SOURCE_DIR}/tests/cuda/ep_test.cpp)
  target_link_libraries(qmoe_ep_tests PRIVATE qmoe CUDA::cudart)
  target_include_directories(qmoe_ep_tests PRIVATE ${PROJECT_SOURCE_DIR}/src)
endif()
if(QMOE_CUDA_BENCH)
  add_executable(qmoe_ep_bench ${PROJECT_SOURCE_DIR}/bench/ep_bench.cpp)
  target_link_libraries(qmoe_ep_bench PRIVATE qmoe CUDA::cudart)
  target_include_directories(qmoe_ep_bench PRIVATE ${PROJECT_SOURCE_DIR}/src)
endif()
