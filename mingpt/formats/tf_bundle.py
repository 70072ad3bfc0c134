"""
A TensorFlow checkpoint (a "tensor bundle"), read without TensorFlow. It is two kinds of file:

    model.ckpt.index                    an SSTable (LevelDB's table format) mapping each variable name
                                        to a BundleEntryProto (dtype, shape, shard, offset, size, crc32c)
    model.ckpt.data-0000x-of-0000n      the raw little-endian bytes of the tensors

plus, in a checkpoint directory, a text file `checkpoint` naming the latest prefix. The readers
below (CRC-32C, protobuf fields, SSTable blocks, bundle entries) are what those formats need, no
more. read_tf_checkpoint gives {variable name: numpy array}; formats.tf maps OpenAI's GPT-2 onto it.
"""

import math
import re
import struct
from pathlib import Path

from mingpt.errors import WeightsError

# -----------------------------------------------------------------------------
# CRC-32C, the checksum of every SSTable block and every tensor

def _crc_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)  # Castagnoli polynomial, reflected
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data):
    """
    CRC-32C (Castagnoli) of bytes. Byte by byte in Python is far too slow for GB checkpoints, so
    large inputs are cut into K equal chunks whose CRCs advance together as one numpy vector, four
    bytes per step; since the CRC register is linear over GF(2), the chunk CRCs are then chained
    with the operator "advance over L zero bytes", precomputed as four 256-entry tables.
    """
    import numpy as np
    buf = np.frombuffer(data, dtype=np.uint8)
    n, crc = len(buf), 0xFFFFFFFF
    K = min(1 << 16, n // 1024)  # chunks (vector lanes); a few thousand bytes each at least
    L = n // K // 4 * 4 if K >= 64 else 0  # bytes per chunk, whole 32-bit words
    if L:
        T = np.array(_CRC_TABLE, dtype=np.uint32)

        def zero_bytes(x, count):  # advance registers x over `count` zero bytes
            for _ in range(count):
                x = T[x & 0xFF] ^ (x >> 8)
            return x

        # feeding a little-endian word w into register s is advancing s ^ w over 4 zero bytes, a
        # linear map of 32 bits: split into two 16-bit lookups
        v = np.arange(1 << 16, dtype=np.uint32)
        lo_table, hi_table = zero_bytes(v, 4), zero_bytes(v << 16, 4)
        words = buf[:K * L].view('<u4').reshape(K, L // 4).T.copy()  # (L/4, K): step j, every chunk
        state, lo, tmp = np.zeros(K, np.uint32), np.empty(K, np.uint32), np.empty(K, np.uint32)
        for w in words:
            state ^= w
            np.bitwise_and(state, 0xFFFF, out=lo)
            np.right_shift(state, 16, out=state)
            np.take(hi_table, state, out=tmp)
            np.take(lo_table, lo, out=state)
            state ^= tmp
        # chain the chunks: crc <- advance(crc over L bytes) ^ chunk crc (each computed from 0)
        basis = zero_bytes(np.array([1 << b for b in range(32)], dtype=np.uint32), L)
        bits = (np.arange(256)[:, None] >> np.arange(8)) & 1  # (256, 8)
        advance = [np.bitwise_xor.reduce(np.where(bits, basis[8 * k:8 * k + 8], 0), axis=1).tolist()
                   for k in range(4)]
        for c in state.tolist():
            crc = (advance[0][crc & 0xFF] ^ advance[1][(crc >> 8) & 0xFF] ^
                   advance[2][(crc >> 16) & 0xFF] ^ advance[3][crc >> 24] ^ c)
    for b in buf[K * L if L else 0:].tolist():
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _crc_unmask(masked):
    """ LevelDB and TF store CRCs "masked" (rotated, offset) so that CRCs of CRCs stay well-behaved """
    rot = (masked - 0xa282ead8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# -----------------------------------------------------------------------------
# varints (LevelDB's tables use them too) and protobuf's wire format, as far as the bundle needs it

def _varint(buf, pos):
    """ a protobuf / LevelDB base-128 varint at buf[pos] -> (value, position after it) """
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _proto_fields(buf):
    """ the (field number, value) pairs of a protobuf message; ints for varints and fixed, bytes for the rest """
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from('<Q', buf, pos)[0], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = bytes(buf[pos:pos + n]), pos + n
        elif wire == 5:
            value, pos = struct.unpack_from('<I', buf, pos)[0], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield field, value


# -----------------------------------------------------------------------------
# the SSTable of the .index file: data blocks of key/value entries, an index block, a footer

_SSTABLE_MAGIC = 0xdb4775248b80fb57


def _block_handle(buf, pos=0):
    """ a BlockHandle, (varint offset, varint size), at buf[pos] -> (offset, size, position after it) """
    offset, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return offset, size, pos


def _sstable_block(data, offset, size):
    """ the contents of the block at data[offset:offset+size], after checking its trailer """
    if offset + size + 5 > len(data):
        raise ValueError(f"the block at byte {offset} runs past the end of the file")
    # a 5-byte trailer: compression type (0 = none; TF writes bundles uncompressed) and masked crc32c
    kind, crc = data[offset + size], struct.unpack_from('<I', data, offset + size + 1)[0]
    if kind != 0:
        raise ValueError(f"block compressed with type {kind}; only uncompressed tables are supported")
    if crc32c(data[offset:offset + size + 1]) != _crc_unmask(crc):
        raise ValueError(f"the block at byte {offset} fails its crc32c check")
    return data[offset:offset + size]


def _sstable_entries(block):
    """ the (key, value) entries of a block: each key shares a prefix with the one before it """
    num_restarts = struct.unpack_from('<I', block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * num_restarts  # the restart-point array is only a search index: skip it
    pos, key = 0, b''
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        n, pos = _varint(block, pos)
        key = key[:shared] + bytes(block[pos:pos + unshared])
        pos += unshared
        yield key, bytes(block[pos:pos + n])
        pos += n


def read_sstable(path):
    """ {key: value} of a whole SSTable file (LevelDB's table format, which TF's .index files use) """
    data = memoryview(Path(path).read_bytes())
    # the 48-byte footer: metaindex and index block handles, zero padding, then the magic number
    if len(data) < 48 or struct.unpack_from('<Q', data, len(data) - 8)[0] != _SSTABLE_MAGIC:
        raise ValueError("it does not end in an SSTable footer: truncated, or not a TF index file")
    _, _, pos = _block_handle(data, len(data) - 48)  # the metaindex: TF writes an empty one
    index = _sstable_block(data, *_block_handle(data, pos)[:2])
    table = {}
    for _, handle in _sstable_entries(index):  # the index: last key of each data block -> its handle
        table.update(_sstable_entries(_sstable_block(data, *_block_handle(handle)[:2])))
    return table


# -----------------------------------------------------------------------------
# the tensor bundle: the index's entries, then the tensors in the data files

_TF_DTYPES = {1: '<f4', 2: '<f8', 3: '<i4', 4: 'u1', 5: '<i2', 6: 'i1', 9: '<i8', 10: '?',
              14: 'bfloat16', 19: '<f2'}  # tensorflow/core/framework/types.proto


def _bundle_entry(value):
    """ a BundleEntryProto (tensorflow/core/protobuf/tensor_bundle.proto) -> dict """
    entry = dict(dtype=0, shape=[], shard_id=0, offset=0, size=0, crc32c=None, sliced=False)
    for field, v in _proto_fields(value):
        if field == 1:
            entry['dtype'] = v
        elif field == 2:  # TensorShapeProto: repeated Dim dim = 2, whose int64 size = 1
            entry['shape'] = [dict(_proto_fields(dim)).get(1, 0) for f, dim in _proto_fields(v) if f == 2]
        elif field in (3, 4, 5):
            entry[{3: 'shard_id', 4: 'offset', 5: 'size'}[field]] = v
        elif field == 6:
            entry['crc32c'] = v
        elif field == 7:
            entry['sliced'] = True  # a partitioned variable, stored as slices elsewhere
    return entry


def checkpoint_prefix(path):
    """ the checkpoint prefix ('.../model.ckpt') of a checkpoint directory or prefix """
    path = Path(path)
    if path.is_dir():
        name = 'model.ckpt'
        if (path / 'checkpoint').is_file():  # the text file saying which checkpoint is the latest
            m = re.search(r'^model_checkpoint_path:\s*"(.+)"', (path / 'checkpoint').read_text(), re.M)
            name = Path(m.group(1)).name if m else name  # relative: the directory may have moved
        return path / name
    return path.with_name(path.name.removesuffix('.index'))


def index_file(prefix):
    """ the index of the checkpoint with this prefix: .../model.ckpt -> .../model.ckpt.index """
    return prefix.with_name(prefix.name + '.index')


def read_tf_index(path):
    """ the variables of a TF checkpoint (directory or prefix) -> (prefix, {name: entry}, number of data files) """
    prefix = checkpoint_prefix(path)
    index_path = index_file(prefix)
    if not index_path.is_file():
        raise WeightsError(f"{index_path}: not found; a TensorFlow checkpoint needs its .index file")
    try:
        table = read_sstable(index_path)
        header = dict(_proto_fields(table.pop(b'', b'')))  # BundleHeaderProto under the empty key
        entries = {k.decode('utf-8'): _bundle_entry(v) for k, v in table.items()}
    except (ValueError, IndexError, struct.error) as e:  # UnicodeDecodeError is a ValueError
        raise WeightsError(f"{index_path}: not a readable TensorFlow checkpoint index ({e}); the file "
                           "is corrupt: download it again") from None
    if header.get(2, 0) != 0:
        raise WeightsError(f"{index_path}: a big-endian checkpoint; only little-endian ones are supported")
    return prefix, entries, header.get(1, 1)


def read_tf_checkpoint(path, names=None, verify=True):
    """
    {variable name: numpy array} of a TensorFlow checkpoint (a directory with a `checkpoint`
    file, or the prefix such as models/124M/model.ckpt), without TensorFlow. names: only these
    variables (default: all). verify: check each tensor's crc32c, as TF does.
    """
    import numpy as np
    prefix, entries, num_shards = read_tf_index(path)
    index_path = index_file(prefix)
    names = list(entries) if names is None else names
    missing = [n for n in names if n not in entries]
    if missing:
        raise WeightsError(f"{index_path}: the checkpoint has no variable {', '.join(missing[:4])}"
                           + (f" (and {len(missing) - 4} more)" if len(missing) > 4 else ''))
    # every data file must be as long as the index says, whichever variables we read from it
    data_paths = [prefix.with_name(f"{prefix.name}.data-{i:05d}-of-{num_shards:05d}") for i in range(num_shards)]
    for shard, data_path in enumerate(data_paths):
        if not data_path.is_file():
            raise WeightsError(f"{data_path}: not found; the checkpoint is incomplete")
        need = max([e['offset'] + e['size'] for e in entries.values() if e['shard_id'] == shard], default=0)
        if data_path.stat().st_size < need:
            raise WeightsError(f"{data_path}: too short: {data_path.stat().st_size} bytes, but the index "
                               f"places tensors up to byte {need}; it is truncated: download it again")
    out, files = {}, {}
    try:
        for name in names:
            e = entries[name]
            if e['sliced'] or e['dtype'] not in _TF_DTYPES or not 0 <= e['shard_id'] < num_shards:
                raise WeightsError(f"{index_path}: variable {name} is partitioned, in a shard that does "
                                   f"not exist or of an unsupported dtype ({e['dtype']})")
            data_path = data_paths[e['shard_id']]
            if data_path not in files:
                files[data_path] = open(data_path, 'rb')
            f = files[data_path]
            buf = bytearray(e['size'])
            f.seek(e['offset'])
            if f.readinto(buf) != e['size']:
                raise WeightsError(f"{data_path}: too short: variable {name} needs bytes {e['offset']} to "
                                   f"{e['offset'] + e['size']} but the file has {data_path.stat().st_size}; "
                                   "it is truncated: download it again")
            if verify and e['crc32c'] is not None and crc32c(buf) != _crc_unmask(e['crc32c']):
                raise WeightsError(f"{data_path}: variable {name} fails its crc32c check: the file is "
                                   "corrupt: download it again")
            dtype = _TF_DTYPES[e['dtype']]
            if dtype == 'bfloat16':  # numpy has no bf16: widen the bits to float32's upper half
                arr = (np.frombuffer(buf, dtype='<u2').astype(np.uint32) << 16).view(np.float32)
            else:
                arr = np.frombuffer(buf, dtype=dtype)
            if arr.size != math.prod(e['shape']):
                raise WeightsError(f"{index_path}: variable {name} has {arr.size} values for shape {e['shape']}")
            out[name] = arr.reshape(e['shape'])
    finally:
        for f in files.values():
            f.close()
    return out
