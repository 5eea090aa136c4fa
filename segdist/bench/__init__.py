"""python -m segdist.bench: performance figures as JSON, also logged to MLflow.

What each section measures, and where it lives (`python -m segdist.bench COMMAND`):

    data   (data.py) samples per second per core: shards (read + decode + augment), the
           same samples from the raw VOC-layout folder with the same transforms, and bare
           JPEG + PNG decode of the same files (the limit)
    train  (train.py) DeepLabv2 ResNet-101 `naked` at 321x321, batch 2: segdist's training
           step in fp32, bf16 autocast and bf16 + channels_last: images/s, FLOPs per image
           (torch.utils.flop_counter), achieved GFLOP/s against a matmul roofline measured
           in the same run; and the quick start's step (its own model, crop and batch, one
           thread) on a fixed batch and with the real loader: step rate and data-wait fraction
    ray    (ray.py) the quick start's training loop, same data, a fixed number of steps,
           under Ray Train (TorchTrainer, 2 workers, gloo) and under plain torch.distributed
           (gloo, 2 processes, no Ray): steady-state throughput ratio and trial start-up time
    scale  (scale.py) the same loop on 1 and on 2 plain torch.distributed workers: scaling
           efficiency
    gpu    (gpu.py; CUDA only) ResNet-101 `naked` at 321 and 513: images/s, MFU against the
           device's peak from a table, peak memory, for fp32, bf16 + channels_last and
           bf16 + channels_last + torch.compile
    eval   (evaluation.py) seconds per image of whole-image inference, MSF and DenseCRF with
           a random-weight ResNet-101 `naked` on random 500x375 images (not part of `all`)
    study  (study.py) a loopback study of 500 one-epoch trivial trials through segdist's seed
           searcher, Ray Tune and MLflow callback into a real store (sqlite, or an `mlflow
           server` on 127.0.0.1): wall, driver CPU and MLflow time per trial, peak driver
           memory and its growth, MLflow writes per second, every run checked (not in `all`)
    all    (__main__.py) every section in one JSON object, with the targets checked

Shared by the sections: common.py (the quick start's trial, generated shards, the set-up
and timed steps), runners.py (the loop of `ray` and `scale` on one rank, and its plain and
Ray launchers), machine.py (CPU, versions, load), record.py (printing, MLflow);
__main__.py is the command line.

Every section that trains runs segdist's own training step: the set-up of
segdist.train.training_setup (the recipe's model, optimizer, schedule, L2 term, precision,
NaN rule, host flag group, DDP) and segdist.train.train_one_epoch, with the data of
segdist.train.epoch_loader where it reads data; a section module's docstring says what it
changes and why (a fixed in-memory batch, a precision set per run).

All figures are measured on this machine when the command runs; nothing is hard-coded
except the GPU peak table (vendor data sheet numbers, named in the output). Every run is
also an MLflow run of the experiment "segdist-bench" (params: versions, CPU, cores,
device, settings; metrics: the figures; the JSON as an artifact) unless --no-mlflow.
"""
