"""jaxpp: MPMD pipeline parallelism for JAX, with Pallas GPU kernels in the stages.

`import jaxpp` and `import jaxpp.api as jaxpp` give the same names.
"""
