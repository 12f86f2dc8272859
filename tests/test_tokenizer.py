from hh_helpers import synthetic_pairs

from infalign.models.data import parse_pairs
from infalign.models.tokenizer import load_or_train_tokenizer, load_tokenizer, train_bpe_tokenizer, training_texts

TEXTS = ["\n\nHuman: Héllo wörld! 你好 🙂  double  spaces\ttab\n\nAssistant: Sure — “quotes” & émojis 🚀",
         " leading space", "trailing space ", "\n\n\n", "x" * 50]


def test_round_trip_and_special_tokens(tmp_path):
    recs = parse_pairs(synthetic_pairs(40))[0]
    tok = train_bpe_tokenizer(training_texts(recs) + TEXTS, vocab_size=400)
    for text in TEXTS + [recs[0].prompt + recs[0].chosen]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text  # byte-level: exact, even for unseen characters
    assert tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"
    # a response encodes the same alone and after its prompt (no prefix-space surprises)
    r = recs[0]
    joint = tok(r.prompt + r.chosen, add_special_tokens=False)["input_ids"]
    assert tok.decode(joint) == r.prompt + r.chosen
    tok.save_pretrained(tmp_path / "t")
    again = load_tokenizer(tmp_path / "t")
    assert again(TEXTS[0])["input_ids"] == tok(TEXTS[0])["input_ids"] and again.padding_side == "left"
    batch = again(["a", "a much longer text"], padding=True)
    assert batch["attention_mask"][0][0] == 0  # left padding


def test_tokenizer_is_cached_per_data_and_config(tmp_path):
    recs = parse_pairs(synthetic_pairs(30))[0]
    _, e1 = load_or_train_tokenizer({"vocab_size": 300}, recs, "fp1", tmp_path)
    _, e2 = load_or_train_tokenizer({"vocab_size": 300}, recs, "fp1", tmp_path)
    _, e3 = load_or_train_tokenizer({"vocab_size": 320}, recs, "fp1", tmp_path)
    _, e4 = load_or_train_tokenizer({"vocab_size": 300}, recs, "fp2", tmp_path)
    assert not e1.hit and e2.hit and e2.path == e1.path
    assert len({e1.path, e3.path, e4.path}) == 3
