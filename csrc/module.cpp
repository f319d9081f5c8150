// The Python module bsr_kernels._C. It holds no Python functions: importing it loads this shared
// library, whose static initialisers register the bsr_kernels::cpp_* operators (drop_tokens.cpp)
// with the PyTorch dispatcher. Call them as torch.ops.bsr_kernels.*.
#include <Python.h>

extern "C" {

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // m_name
      "C++ CPU kernels of bsr_kernels, registered as torch.ops.bsr_kernels.cpp_*.",  // m_doc
      -1,    // m_size
      nullptr,  // m_methods
  };
  return PyModule_Create(&module_def);
}

}  // extern "C"
