"""Python access to the plugins_cpp CUDA kernel library (kernels.py); the C++/CUDA sources and
the TensorRT plugin are built with CMake (root CMakeLists.txt)."""
