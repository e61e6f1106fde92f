import os

# Triton kernels run under the interpreter on machines without a GPU (CI); set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
