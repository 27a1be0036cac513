"""Training on several processes under ``torchrun``, one job a module:

- ``processes``: joining the job; each rank's place in the (replicas × stages) mesh (``DistEnv``).
- ``data_parallel``: replicas of the whole model, gradients averaged before every optimizer step.
- ``layout``: how the units lie across processes, for the session, loop and checkpoints: one
  process (``Layout``) or this process's stage of a pipeline (``Pipeline``), whose cut may move once.
- ``split``: where a pipeline's cuts go (by hand, or balanced by timing probes; rebalancing's cut).
- ``ownership``: which tensors each stage updates, broadcast at an epoch's end, and their optimizer
  state when the cut moves.
- ``transport``: a local rule's stage (``LocalStage``) and the messages it exchanges (``Courier``).
- ``backprop``: backprop's stage, through ``torch.distributed.pipelining`` (``BackpropStage``).

The stage parts of a pipeline's checkpoint are files of ``trainer.checkpoint_file``. This package
imports none of its modules here: import the one you need.
"""
