"""CLIP's text tower computing only what its pooled embedding depends on: the same vectors, less work per query.

CLIP's text transformer is causally masked and its embedding is the final hidden state of the end-of-text token
(projected). Two parts of the usual forward pass therefore never reach that embedding:
- The start-of-text token. Every query begins with it at position 0, and under the causal mask position 0 attends
  only to itself, so its hidden state (and its keys and values) at every layer is the same for every query. They
  are computed once here (`bos_keys`, `bos_values`) and the layers run on the other tokens only.
- All but one row of the last layer. Its keys and values are needed for every token (the end-of-text token
  attends to them), but its query, attention, output projection and MLP only for the end-of-text token.
For a query of 12 tokens that is about 15% of the forward pass (a thirteenth of every layer, and five sixths of the
last one for all but one row); for short queries more.

No work on padding either: a batch's queries are packed into one sequence of their real tokens (the padding the
tokenizer adds on the right dropped), each token attending only to the earlier tokens of its own query and to the
shared start-token column. Queries differ in length, so a micro-batch padded to its longest ran 1.45x (4 queries),
1.67x (8) and 1.94x (16) the token rows it needs (random draws from the smoothing calibration set, ViT-B/32's
tokenizer); the linear layers, nearly all of the work at these lengths, now run on the real rows only. The
attention over the packed sequence grows with the square of its length, so callers pack at most PACK_QUERIES
queries at a time. The attention is written out as in transformers' eager CLIP attention (softmax in float32).
The result is checked against transformers' own forward pass wherever it is used (the ONNX export's and the bf16
copy's cosine floors) and in tests/integration/test_text_tower.py.

With `states` the tower extends the start token's reuse to any prefix a query shares with others
(models/text_prefix.py). It then takes each query's tokens after its own prefix (input_ids / attention_mask, right
padded), the position of the first of them (`start`: 1 + the prefix's length), the keys and values of the prefixes
the pass's queries were given (`prefix_keys` / `prefix_values`: layers, heads, C columns, head_dim; C may be 0) and
which query may attend to which of those columns (`prefix_allowed`: batch, C; > 0 where allowed), so queries with
different prefixes share one pass. It returns each layer's keys and values (the start token's column, the C prefix
columns, then the packed tokens') beside the embedding, so a prefix first seen in a pass can be kept from it.
"""

from __future__ import annotations

from typing import Any

# Queries packed into one pass at most: at 16 queries of 10 tokens the packed attention is about 5% of the
# pass's multiply-adds (a padded batch of 16 wastes half its rows); a longer list is encoded in chunks of this
# many.
PACK_QUERIES = 16
# The graph's name in remembered runtime choices (models/runtime_choice.py): timings of an earlier graph (the
# padded batch, "packed": the packed batch without prefix inputs) are not reused.
GRAPH = "prefixed"


def bos_token_id(tokenize: Any) -> int | None:
    """The token every query starts with, if the tokenizer adds one: two unrelated texts must share it."""
    ids = tokenize(["a photo of a cat", "zebra"])["input_ids"]
    first = {int(row[0]) for row in ids}
    return first.pop() if len(first) == 1 else None


def make(text_model: Any, projection: Any, bos_id: int | None, states: bool = False) -> Any:
    """text_model: transformers' CLIPTextModel (or its bf16 copy); projection: CLIP's text projection. Returns a
    module (input_ids, attention_mask) -> projected embedding (not normalized) in the text model's dtype; with
    `states` (only where there is a start token), (input_ids, attention_mask, start, prefix_keys, prefix_values,
    prefix_allowed) -> (embedding, keys of each layer..., values of each layer...), input_ids and attention_mask
    holding each query's tokens after its prefix (see the module's docstring). Called with whole rows alone
    (input_ids, attention_mask), it runs them as before, whichever mode."""
    import torch

    class PooledTextTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text, self.projection = text_model, projection
            layers = text_model.encoder.layers
            attn = layers[0].self_attn
            self.heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
            self.eos_token_id = int(text_model.eos_token_id)
            self.skip_bos = bos_id is not None
            self.states = states and self.skip_bos
            self.layers = len(layers)
            empty = torch.empty(0, dtype=text_model.final_layer_norm.weight.dtype)
            keys, values = self._bos_states(bos_id) if bos_id is not None else (empty, empty)
            self.register_buffer("bos_keys", keys, persistent=False)  # (layers, heads, 1, head_dim)
            self.register_buffer("bos_values", values, persistent=False)

        @torch.no_grad()
        def _bos_states(self, bos: int) -> tuple[Any, Any]:
            """Keys and values of the start-of-text token at position 0 in every layer (it attends to itself only)."""
            emb = self.text.embeddings
            ids = torch.tensor([[bos]], device=emb.position_embedding.weight.device)
            x = emb.token_embedding(ids) + emb.position_embedding.weight[:1]
            keys, values = [], []
            for layer in self.text.encoder.layers:
                h = layer.layer_norm1(x)
                keys.append(self._split(layer.self_attn.k_proj(h)))
                values.append(self._split(layer.self_attn.v_proj(h)))
                v = values[-1]  # one key: softmax of a single score is 1, the output is its value
                x = x + layer.self_attn.out_proj(v.transpose(1, 2).reshape(1, 1, -1))
                x = x + layer.mlp(layer.layer_norm2(x))
            return torch.cat(keys, 0), torch.cat(values, 0)

        def _split(self, t: Any) -> Any:  # (B, L, D) -> (B, heads, L, head_dim)
            return t.view(t.shape[0], t.shape[1], self.heads, self.head_dim).transpose(1, 2)

        def _attend(self, q: Any, k: Any, v: Any, mask: Any) -> Any:  # -> (B, Lq, D)
            w = torch.matmul(q * self.scale, k.transpose(-1, -2)) + mask
            w = torch.nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(w, v).transpose(1, 2)
            return out.reshape(out.shape[0], out.shape[1], -1)

        def empty_prefix(self) -> Any:
            """prefix_keys / prefix_values of no tokens: (layers, heads, 0, head_dim)."""
            b: Any = self.bos_keys
            return b.new_zeros((b.shape[0], b.shape[1], 0, b.shape[3]))

        def forward(
            self,
            input_ids: Any,
            attention_mask: Any,
            start: Any = None,
            prefix_keys: Any = None,
            prefix_values: Any = None,
            prefix_allowed: Any = None,
        ) -> Any:
            if start is None or not self.skip_bos:  # whole rows: the start token (if any) is skipped here
                first = 1 if self.skip_bos else 0
                ids, real = input_ids[:, first:], attention_mask[:, first:] > 0
                start = torch.full((ids.shape[0],), first, dtype=torch.int64, device=ids.device)
                prefix_keys = prefix_values = prefix_allowed = None
            else:
                ids, real = input_ids, attention_mask > 0
            emb, keys, values = self._pass(ids, real, start, prefix_keys, prefix_values, prefix_allowed)
            return (emb, *keys, *values) if self.states else emb

        def _pass(
            self, ids: Any, real: Any, start: Any, prefix_keys: Any, prefix_values: Any, prefix_allowed: Any
        ) -> Any:
            """ids / real (B, n): each query's tokens from position start[b] on (right padding)."""
            emb, layers = self.text.embeddings, self.text.encoder.layers
            given = prefix_keys is not None
            batch, n = ids.shape[0], ids.shape[1]
            # The batch's real tokens packed into one sequence (T of them), each with its position and its query.
            positions = start.unsqueeze(1) + torch.arange(n, device=ids.device).unsqueeze(0)
            query = torch.arange(batch, device=ids.device).unsqueeze(1).expand(batch, n)
            pos, seg = positions[real], query[real]  # (T,)
            x = emb.token_embedding(ids[real]) + emb.position_embedding.weight[pos]
            x = x.to(self.text.final_layer_norm.weight.dtype).unsqueeze(0)  # (1, T, D)
            # The end-of-text token's place in the packed sequence. transformers' legacy configs (eos_token_id 2):
            # it is the token with the largest id.
            ids32 = ids.to(torch.int32)
            if self.eos_token_id == 2:
                eot = ids32.argmax(dim=-1)
            else:
                eot = (ids32 == self.eos_token_id).to(torch.int32).argmax(dim=-1)
            lengths = real.sum(dim=1)
            eot = torch.cumsum(lengths, 0) - lengths + eot  # (B,)
            # Token r attends to token c of its own query at or before its position (the causal mask, block by
            # block), and to the start token's cached column, which every query shares.
            low, zero = torch.tensor(torch.finfo(x.dtype).min, dtype=x.dtype), torch.zeros((), dtype=x.dtype)
            allowed = (seg.unsqueeze(0) == seg.unsqueeze(1)) & (pos.unsqueeze(0) <= pos.unsqueeze(1))
            mask = torch.where(allowed, zero, low)  # (T, T)
            if given:  # the prefix columns its query was given (prefix_allowed: (B, C), > 0 where given)
                mask = torch.cat([torch.where(prefix_allowed[seg] > 0, zero, low), mask], 1)  # (T, C + T)
            if self.skip_bos:  # the start token's column, which every query shares
                mask = torch.cat([mask.new_zeros((mask.shape[0], 1)), mask], 1)
            bos_keys: Any = self.bos_keys
            bos_values: Any = self.bos_values
            all_keys, all_values = [], []
            for i, layer in enumerate(layers):
                a = layer.self_attn
                h = layer.layer_norm1(x)
                k, v = self._split(a.k_proj(h)), self._split(a.v_proj(h))
                if given:
                    k = torch.cat([bos_keys[i : i + 1], prefix_keys[i : i + 1], k], 2)
                    v = torch.cat([bos_values[i : i + 1], prefix_values[i : i + 1], v], 2)
                elif self.skip_bos:
                    k = torch.cat([bos_keys[i : i + 1], k], 2)
                    v = torch.cat([bos_values[i : i + 1], v], 2)
                all_keys.append(k)
                all_values.append(v)
                if i < len(layers) - 1:
                    x = x + a.out_proj(self._attend(self._split(a.q_proj(h)), k, v, mask))
                    x = x + layer.mlp(layer.layer_norm2(x))
                    continue
                # The last layer, for the end-of-text rows only (one per query).
                xe, he = x[:, eot], h[:, eot]  # (1, B, D)
                xe = xe + a.out_proj(self._attend(self._split(a.q_proj(he)), k, v, mask[eot]))
                xe = xe + layer.mlp(layer.layer_norm2(xe))
                x = xe
            return self.projection(self.text.final_layer_norm(x[0])), all_keys, all_values

    return PooledTextTower().eval()
