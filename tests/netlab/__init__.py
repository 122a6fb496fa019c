"""A network lab on this machine's kernel: hosts as network namespaces, links with real rate
limits, partitions, lost hosts, NATS hubs, leaf nodes and clusters on their own hosts.

Shared by the tests (tests/test_lab.py) and the WAN benchmark (benchmarks/lab.py).  It knows
nothing of Pangea beyond `python -m pangea <role>` and PANGEA_* variables (roles.py).
Needs root, `ip` and `tc` (iproute2), veth, bridges and the tbf qdisc: `unavailable()` says
which is missing, for a skip reason.
"""

from tests.netlab.kernel import LabError
from tests.netlab.kernel import missing as unavailable
from tests.netlab.topology import Host, Lab, Link, Process, Site, Traffic

__all__ = ["Host", "Lab", "LabError", "Link", "Process", "Site", "Traffic", "unavailable"]
