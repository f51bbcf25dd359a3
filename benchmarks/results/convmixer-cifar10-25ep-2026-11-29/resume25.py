# resume the 25-epoch run with flush-to-zero set before torch starts its thread pool
import sys, torch
torch.set_flush_denormal(True)
from mixlab.cli import main
sys.exit(main(["train", "--resume", "runs/convmixer-cifar10-25ep"]))
