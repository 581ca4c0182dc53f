"""The loopback front end: local programs issue SCSI commands to the STML."""
from fetd_loopback.client import (LinkLost, LoopbackClient, NexusGone, NexusRefused, ScsiError,
                                  ScsiResult, TaskAborted)

__all__ = ["LinkLost", "LoopbackClient", "NexusGone", "NexusRefused", "ScsiError", "ScsiResult", "TaskAborted"]
