"""Data: raw text (memmap blocks), instructions (templates and masks); batches are dicts of tensors.
(Nothing heavy is imported here: the verbs' --help reads data.formats.)"""


def to_device(batch: dict, device) -> dict:
    """Move a batch's tensors to `device` (other values, such as counts, pass through)."""
    import torch

    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
