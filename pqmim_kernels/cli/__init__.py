"""The ``pqmim`` command line tool (see :mod:`pqmim_kernels.cli.main`)."""
