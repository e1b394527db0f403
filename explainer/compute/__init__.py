"""The compute tier: untrusted and heavy work runs in worker processes, behind one job interface.

The web server never loads or runs an uploaded model itself. It submits jobs (a model source, an
operation, plain arguments) to an executor and waits on their handles; see :mod:`.jobs` for the
interface, :mod:`.local` for the local worker processes with their hard limits, :mod:`.tasks`
for what a worker does, and :mod:`.wire` for the plain-data format between them.
"""

from explainer.compute.jobs import Executor, JobHandle, ModelSource
from explainer.compute.local import LocalExecutor, WorkerStatus
from explainer.compute.tasks import OPERATIONS, ModelSession

__all__ = [
    "OPERATIONS",
    "Executor",
    "JobHandle",
    "LocalExecutor",
    "ModelSession",
    "ModelSource",
    "WorkerStatus",
]
