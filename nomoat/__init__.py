"""nomoat: open LLMs with LoRA adapters on the devices people already own.

The source keeps the two halves at the top of the repository (edge/ runs on the device, export/ on a laptop or
server); the wheel installs them as nomoat.edge and nomoat.export, so that nomoat never claims the top-level names
`edge` or `export`, which other distributions use too.
"""

__version__ = "0.1.0"
