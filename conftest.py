"""Shared by tests/ and bench/: without a GPU, Triton kernels run under its interpreter on CPU
tensors. This must happen before anything imports triton."""
import os

if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    # Checked through the device node so that neither torch.cuda nor triton is imported first.
    os.environ["TRITON_INTERPRET"] = "1"
