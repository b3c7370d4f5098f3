import os

import torch

# One thread per process: the suite runs several processes at once (gloo pairs, DataLoader
# workers, command-line runs) on 2 cores, where more threads only fight over them.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
