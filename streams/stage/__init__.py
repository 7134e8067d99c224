"""The application layer of the worker's stages: what each agent decides, without Faust.

The pure domain (``streams.domain``) says what one input does to one key
entry; the agents (``agents/``) read Kafka records and tables and write
them. This package is the layer between: it runs a *batch* of records
against the entries they touch and returns what the agent must do, as
plain, typed values, so that the agents are I/O only and tests, the demo,
the benchmarks and the reliability checker run the very code the worker
runs.

* ``route``   -- the stateless route stage: a raw intake record -> routed
  envelope or dead letter (``route_message``, ``dead_letter``).
* ``outputs`` -- what an input produces (:class:`~streams.stage.outputs.Output`,
  kinds in :class:`~streams.stage.outputs.OutputKind`), its stored form in
  the key entry (for redelivery) and its Kafka records, byte for byte.
* ``apply``   -- the stateful apply stage: :class:`~streams.stage.apply.ApplyBatch`
  decides routed intake and due timers against the key entries and returns
  outputs and table writes; ``UnflushedOutputs`` says when to flush first.
* ``memory``  -- :class:`~streams.stage.memory.MemoryStage`, the apply stage over
  dicts (one input per batch): tests, demo, benchmarks, checker.
* ``deliver`` -- the delivery stage: :class:`~streams.stage.deliver.Deliverer`
  decides what a notification record does (table writes, records to send)
  and which pending deliveries are due; the agent makes the HTTP calls.

Allowed imports: the standard library, ``orjson``, ``schemas`` (the Avro
codec), ``streams.config`` (the tenant model and record limits) and the pure
domain ``streams.domain.*``. Never Faust, aiokafka, asyncpg, Elasticsearch,
HTTP clients, ``streams.metrics`` or ``agents``: metrics, logging and sending
stay in the agents, which read what happened from the returned values.
"""
