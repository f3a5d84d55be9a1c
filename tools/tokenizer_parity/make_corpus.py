#!/usr/bin/env python3
"""Builds the parity corpus: crates/ciyuan-measure/tests/parity/corpus.json.

English and code come from this repository's own files; Chinese and mixed text are
written here; edge cases cover normalization forms, control and zero-width characters,
CJK and kana, emoji, full-width text, special-token strings, long runs of one
character, and a seeded soup of random code points. Deterministic: same output each run.
"""
import json
import pathlib
import random

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "crates/ciyuan-measure/tests/parity/corpus.json"

CHINESE = [
    "词元是人工智能服务中最小的可计量、可定价、可交易的单位。",
    "国家数据局在2026年把词元定义为AI服务的计量单位，文本、代码、图像、音频和视频都可以折算成词元。",
    "服务商必须在API层提供词元级的用量审计和按词元计费。",
    "客户希望在各个子公司之间实时执行预算，并生成财务和ERP系统可以导入的报表。",
    "每一个数字都必须精确、可解释、可证明。",
    "请把这份合同翻译成英文，并列出其中的付款条款、违约责任和争议解决方式。",
    "深度求索的模型用它自己的词表计数，千问的模型也一样，不能用英文分词器去估算中文。",
    "审计员可以独立验证账本：每个条目都在默克尔树里，检查点由Ed25519签名。",
    "今天上海的天气晴，最高气温二十三摄氏度，适合出门散步。",
    "《红楼梦》是中国古典小说的巅峰之作，共一百二十回。",
    "用户：帮我写一个Python函数，计算斐波那契数列的第n项。\n助手：好的，下面是一个使用迭代的实现。",
    "混合文本：GPT-4o 的输入是 19 个词元，输出是 10 个词元，合计 29 个。",
    "数字测试：1234567890，３．１４１５９，二〇二六年十一月二十五日。",
    "日本語のテキストも含めます：トークンの数を正確に数えることが大切です。",
    "한국어 문장도 넣습니다: 토큰 수를 정확하게 세는 것이 중요합니다.",
]

EDGE = [
    "Hello world", "  leading spaces", "trailing   ", "a  1", "abc中文def", " 中文", "中文 abc",
    "12345678", "x²³ ½ Ⅻ", "ﾊﾝｶｸ カタカナ・ひらがな゛゜ー", "゠test", "\x00\x01abc",
    "\u200b\u200bword", "e\u0301 é", "ﬁ ligature", "It's I'M we'LL", "\r\n\r\n  \n", "tab\there\t\t",
    "emoji 👍🏽👨‍👩‍👧 done", "árvíztűrő tükörfúrógép", "Привет, мир!", "مرحبا بالعالم",
    "नमस्ते दुनिया", "한국어 텍스트입니다", "<|endoftext|> <|im_start|>",
    "<｜begin▁of▁sentence｜>hi<｜User｜>", "<think>x</think>", "http://example.com/path?q=1&b=2",
    "x=1;y+=2//3", "   ", "\u3000全角スペース\u3000", "‘quotes’ “double” — dash…", "$100.00 €5 ¥3",
    "ǅungla Ǉ", "\U0001F600" * 5, "a\u0308\u0323b", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ＡＢＣ１２３", "\ue000private\ue001",
    "\ufeffBOM", "a\u00adb", "\u0085nel", "\ufffd replacement (what invalid UTF-8 becomes)",
    # Long runs of one character: the cases naive BPE implementations are slow or wrong on.
    "a" * 5000, "中" * 3000, " " * 1000, "\n" * 500, "1" * 1001, "😀" * 300, "ab" * 2000,
]


def main() -> None:
    random.seed(20261125)
    texts = list(EDGE) + CHINESE
    for name in ["README.md", "ARCHITECTURE.md", "crates/ciyuan-ledger/src/verify.rs", "crates/ciyuan-core/src/entry.rs"]:
        lines = (ROOT / name).read_text(encoding="utf-8").split("\n")
        texts += [l for l in lines if l.strip()][:150]
        texts.append("\n".join(lines[:80]))
    for a in CHINESE:
        texts.append(a + " " + random.choice(EDGE[:20]) + " " + random.choice(CHINESE))
    for _ in range(300):
        texts.append("".join(chr(random.choice([
            random.randint(0x20, 0x7E), random.randint(0xA0, 0x2FFF), random.randint(0x3000, 0x30FF),
            random.randint(0x4E00, 0x9FA5), random.randint(0xAC00, 0xD7A3), random.randint(0x1F300, 0x1FAFF),
            random.choice([9, 10, 13, 32, 0x3000, 0x200B]),
        ])) for _ in range(random.randint(1, 60))))
    OUT.write_text(json.dumps(texts, ensure_ascii=True, indent=0) + "\n", encoding="utf-8")
    print(f"{len(texts)} texts -> {OUT}")


if __name__ == "__main__":
    main()
