# Hints that let find_package(Torch) work with a PyTorch *wheel* (pip install torch):
#  * Torch's CMake package lives inside the wheel (torch.utils.cmake_prefix_path);
#  * a CUDA wheel's TorchConfig wants a CUDA toolkit root and an nvrtc library, and ATen's CUDA
#    headers include cuSPARSE/cuBLAS headers that ship in the wheel's nvidia packages, not
#    necessarily in the toolkit.
# Values already set by the caller win. Sets IMAGEPIECE_CUDA_INCLUDE_DIRS (maybe empty).
include_guard(GLOBAL)

# Only to find torch: with Torch_DIR known (an installed package's config sets it), no Python is looked up, and
# none of FindPython's variables land in the caller's project.
if(NOT IMAGEPIECE_PYTHON_EXECUTABLE AND NOT Torch_DIR)
  find_package(Python QUIET COMPONENTS Interpreter)
  set(IMAGEPIECE_PYTHON_EXECUTABLE "${Python_EXECUTABLE}")
endif()

if(IMAGEPIECE_PYTHON_EXECUTABLE AND NOT Torch_DIR)
  execute_process(
    COMMAND "${IMAGEPIECE_PYTHON_EXECUTABLE}" -c "import torch, os; print(torch.utils.cmake_prefix_path); print(os.path.dirname(os.path.dirname(torch.__file__)))"
    OUTPUT_VARIABLE _imagepiece_torch_paths OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _imagepiece_torch_found ERROR_QUIET)
  if(_imagepiece_torch_found EQUAL 0)
    string(REPLACE "\n" ";" _imagepiece_torch_paths "${_imagepiece_torch_paths}")
    list(GET _imagepiece_torch_paths 0 _imagepiece_torch_cmake)
    list(GET _imagepiece_torch_paths 1 IMAGEPIECE_SITE_PACKAGES)
    list(APPEND CMAKE_PREFIX_PATH "${_imagepiece_torch_cmake}")
  endif()
endif()

if(NOT IMAGEPIECE_SITE_PACKAGES AND Torch_DIR)
  get_filename_component(IMAGEPIECE_SITE_PACKAGES "${Torch_DIR}/../../../.." ABSOLUTE)
endif()

if(NOT CUDA_TOOLKIT_ROOT_DIR)
  find_program(_imagepiece_nvcc nvcc PATHS /usr/local/cuda/bin)
  if(_imagepiece_nvcc)
    # nvcc may be a wrapper script on PATH; the toolkit is the one with include/cuda_runtime_api.h.
    foreach(_candidate /usr/local/cuda "${_imagepiece_nvcc}/../..")
      get_filename_component(_candidate "${_candidate}" ABSOLUTE)
      if(EXISTS "${_candidate}/include/cuda_runtime_api.h")
        set(CUDA_TOOLKIT_ROOT_DIR "${_candidate}" CACHE PATH "CUDA toolkit root")
        break()
      endif()
    endforeach()
  endif()
endif()

# Torch's CUDA setup gives CUDA the C++ standard (20), which CMake before 3.26 does not know for nvcc and stops on;
# no CUDA source is compiled here, so 17 costs nothing.
if(NOT DEFINED CMAKE_CUDA_STANDARD)
  set(CMAKE_CUDA_STANDARD 17)
endif()

set(IMAGEPIECE_CUDA_INCLUDE_DIRS "")
if(IMAGEPIECE_SITE_PACKAGES)
  file(GLOB _imagepiece_nvrtc "${IMAGEPIECE_SITE_PACKAGES}/nvidia/cu*/lib/libnvrtc.so.*" "${IMAGEPIECE_SITE_PACKAGES}/nvidia/cuda_nvrtc/lib/libnvrtc.so.*")
  list(FILTER _imagepiece_nvrtc EXCLUDE REGEX "builtins|alt")
  if(_imagepiece_nvrtc AND NOT CUDA_nvrtc_LIBRARY)
    list(GET _imagepiece_nvrtc 0 _imagepiece_nvrtc)
    set(CUDA_nvrtc_LIBRARY "${_imagepiece_nvrtc}" CACHE FILEPATH "nvrtc of the PyTorch wheel")
  endif()
  file(GLOB IMAGEPIECE_CUDA_INCLUDE_DIRS LIST_DIRECTORIES true "${IMAGEPIECE_SITE_PACKAGES}/nvidia/cu*/include")
endif()

# A CUDA build of PyTorch makes find_package(Torch) look for a CUDA toolkit even for an app that runs on the CPU, and
# stop with "Your installed Caffe2 version uses CUDA but I cannot find the CUDA libraries": say first what is missing.
if(NOT CUDA_TOOLKIT_ROOT_DIR AND NOT CUDAToolkit_ROOT AND NOT CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDAToolkit_ROOT}
   AND NOT DEFINED ENV{CUDA_PATH} AND NOT DEFINED ENV{CUDACXX})
  foreach(_imagepiece_caffe2 "${Torch_DIR}/../Caffe2/Caffe2Config.cmake" "${_imagepiece_torch_cmake}/Caffe2/Caffe2Config.cmake")
    if(EXISTS "${_imagepiece_caffe2}")
      file(STRINGS "${_imagepiece_caffe2}" _imagepiece_torch_uses_cuda REGEX "set\\(CAFFE2_USE_CUDA 1\\)")
      if(_imagepiece_torch_uses_cuda)
        message(WARNING "No CUDA toolkit found (no nvcc beside an include/cuda_runtime_api.h, on PATH or in "
                "/usr/local/cuda), and the PyTorch found is a CUDA build: its CMake package needs the toolkit (the "
                "version torch.version.cuda names) even for an app that runs on the CPU. Install it, or set "
                "CUDA_TOOLKIT_ROOT_DIR to it.")
      endif()
      break()
    endif()
  endforeach()
endif()
