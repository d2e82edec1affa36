// The extension module flashmla_ops._C. Importing it loads this shared library, whose static initialisers
// register the CUDA kernels of the torch.ops.flashmla ops (csrc/api/*.cpp). The schemas themselves are
// defined in Python (flashmla_ops/_schema.py), so this module exports no Python functions: it is a plain,
// CPython-version-agnostic (limited API) module with no pybind11.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "flashmla_ops CUDA kernels (sm_90a)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
