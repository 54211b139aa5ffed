# Q3VL_CUDA: the CUDA backend (kernels for Hopper, sm_90a; cuBLASLt). On by default when a CUDA compiler is
# found. Off, core links a stand-in whose only job is to say that this binary has no CUDA backend when a CUDA
# tensor or arena is asked for; the CPU build and its tests are the same either way.
include(CheckLanguage)
check_language(CUDA)
set(Q3VL_CUDA_DEFAULT OFF)
if(CMAKE_CUDA_COMPILER)
  set(Q3VL_CUDA_DEFAULT ON)
endif()
option(Q3VL_CUDA "Build the CUDA backend (needs nvcc and cuBLASLt)" ${Q3VL_CUDA_DEFAULT})

if(Q3VL_CUDA)
  # wgmma and setmaxnreg need the architecture-specific target; no PTX is embedded (the binaries run on
  # Hopper only, and keeping one code object keeps the build and what travels to a GPU node small).
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 90a-real)
  endif()
  enable_language(CUDA)
  # cudart static, so a binary built here needs only the driver and the dynamic CUDA libraries it names.
  set(CMAKE_CUDA_RUNTIME_LIBRARY Static)
  # CMake 3.25 does not know nvcc's C++20 flag (nvcc has had it since 12.0); tell it.
  set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
  set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  find_package(CUDAToolkit REQUIRED)
  if(CCACHE_PROGRAM)
    set(CMAKE_CUDA_COMPILER_LAUNCHER ${CCACHE_PROGRAM})
  endif()
  add_compile_options($<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr>
                      $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall>)
  message(STATUS "q3vl: CUDA backend on (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, architectures ${CMAKE_CUDA_ARCHITECTURES})")
else()
  message(STATUS "q3vl: CUDA backend off")
endif()
