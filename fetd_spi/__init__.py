"""fetd_spi: a simulated parallel SCSI bus (SPI) as a front end.

A discrete-event model of the bus (fetd_spi.bus: IDs, priority arbitration
with optional fairness, the phases with SPI's timing, disconnect/reselect
and tagged queuing, Async to Fast-160 transfers) whose target is served by
the real STML through the contract (fetd_spi.frontend), like every front
end it imports only stml.api from the STML. Initiators run workloads
(fetd_spi.workload); fetd_spi.report measures each ID's throughput,
latency and wait to win arbitration, and the bus time per phase.

    python -m fetd_spi --stml ipc://DATA_DIR/stml.sock --scenario FILE.toml
    scripts/spi_sim.py            # the built-in scenarios, with an STML of their own
"""
