"""Triton kernels, one op per file: ``_<op>_kernel``, its launcher ``<op>(...)`` and its
pure-PyTorch reference ``<op>_ref(...)`` side by side. Call ops through ``lowmem._ops.dispatch``
rather than importing a backend directly, so device and backend overrides are honoured."""
