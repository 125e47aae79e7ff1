"""C++ and CUDA sources of fastft (installed as ``fastft.csrc``); built by fastft.extensions."""
