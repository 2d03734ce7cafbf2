"""The public API under its JaxPP-compatible module name: `import jaxpp.api as jaxpp`."""

import jaxpp as _jaxpp

globals().update({name: getattr(_jaxpp, name) for name in getattr(_jaxpp, "__all__", ())})
__all__ = list(getattr(_jaxpp, "__all__", ()))
