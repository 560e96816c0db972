"""``wattmeter demo``: the whole pipeline on one machine (an aggregator, an agent with simulated GPUs, a synthetic
inference server and a training job on them), with a live view of the energy and of what each request cost."""
