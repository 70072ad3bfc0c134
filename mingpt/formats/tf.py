"""
OpenAI's GPT-2 release (models/124M, ...): hparams.json (n_vocab, n_ctx, n_embd, n_head, n_layer)
beside a TensorFlow checkpoint whose variables are named model/wte, model/h0/attn/c_attn/w, ... (the
parameter table's TF column). The four projections are Conv1D weights, [1, in, out]; the head is
tied to wte. The checkpoint itself is read by formats.tf_bundle.
"""

import torch

from mingpt.errors import WeightsError
from mingpt.formats import param_names, read_json
from mingpt.formats.tf_bundle import checkpoint_prefix, read_tf_checkpoint, read_tf_index


def read_tf(path):
    """
    OpenAI's GPT-2 TensorFlow checkpoint (its directory, or a checkpoint prefix in it) -> (sizes,
    mingpt-layout tensors); the sizes come from the hparams.json beside it
    """
    prefix = checkpoint_prefix(path)
    hparams_path = prefix.parent / 'hparams.json'
    hparams = read_json(hparams_path)
    missing = [k for k in ('n_vocab', 'n_ctx', 'n_embd', 'n_head', 'n_layer') if not isinstance(hparams.get(k), int)]
    if missing:
        raise WeightsError(f"{hparams_path}: missing or not an integer: {', '.join(missing)}")
    last = f"model/h{hparams['n_layer'] - 1}/ln_1/g"
    if last not in read_tf_index(prefix)[1]:  # before listing n_layer layers' names, which may be absurd
        raise WeightsError(f"{hparams_path} says n_layer={hparams['n_layer']} but the checkpoint "
                           f"has no variable {last}: they do not belong together")
    names = param_names(hparams['n_layer'])
    arrays = read_tf_checkpoint(prefix, names=[tf_name for _, tf_name, _ in names])
    tensors = {}
    for name, tf_name, conv1d in names:
        t = torch.from_numpy(arrays[tf_name])
        if conv1d and t.dim() == 3 and t.size(0) == 1:
            t = t[0].t()  # Conv1D's [1, nx, nf] -> nn.Linear's (nf, nx)
        tensors[name] = t
    sizes = dict(n_layer=hparams['n_layer'], n_head=hparams['n_head'], n_embd=hparams['n_embd'],
                 vocab_size=hparams['n_vocab'], block_size=hparams['n_ctx'], tie_weights=True)
    return sizes, tensors
