"""Tests for tcptunnel (run with ``trial tcptunnel``).

Importing the package loads the ``tcptunnel`` hypothesis profile before any test module
builds its ``@settings``: no per-example deadline and no "input generation is slow" health
check.  Both measure wall time, which a loaded CI machine stretches: under 6 busy loops on 2
cores HttpConnectClientTests.test_answer_in_any_split failed FailedHealthCheck ("only
generated 8 valid inputs after 1.33 seconds") for a draw of six integers that takes
microseconds; neither says anything about the property a test proves, and each test's own
trial timeout still bounds it.  ``HYPOTHESIS_PROFILE=default`` brings both back.  (bench/
imports ``_certs`` from here, without the dev extra: then there is no hypothesis to set.)
"""

import os

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - only bench/'s use of _certs
    pass
else:
    settings.register_profile("tcptunnel", deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "tcptunnel"))
