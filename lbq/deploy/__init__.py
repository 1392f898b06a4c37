"""From a trained run to a deployable low-bit model.

- `lbq.deploy.run`: load a run (config, networks, bit-widths, variables) from its workdir.
- `lbq.deploy.program`: the network as a list of operations with integer weight codes.
- `lbq.deploy.pack`: k-bit packing of integer codes.
- `lbq.deploy.package`: the packed integer file, its manifest and their checks.
- `lbq.deploy.integer`: the integer reference forward (NumPy) that reads only those files.
- `lbq.deploy.qonnx_export`: the same program as a QONNX graph.
- `lbq.deploy.verify`: agreement of both with lbq's fake-quantized forward.

The command-line entry points are `lbq.evaluate`, `lbq.export` and `lbq.predict`.
"""

from lbq.deploy.errors import DeployError

__all__ = ["DeployError"]
