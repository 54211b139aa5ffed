"""Writes corpus.json, the strings the tokenizer test encodes (then run gen_reference.sh for their ids).

The corpus is data: edit the lists below (or corpus.json itself) and regenerate. Characters that are invisible,
combining, or changed by NFC are written as \\u escapes in corpus.json so the file shows what it holds.
Standard library only; run it from this folder.
"""
import json
import random
import unicodedata

C = []
def add(*xs): C.extend(xs)
# English, contractions (the regex's case-insensitive group), punctuation
add("Hello world",
    "Hello, world! How's it going? I'm fine; you'll see. We've, they'd, she's.",
    "HELLO'S DON'T I'M YOU'LL WE'VE THEY'D IT'S",
    "don\u2019t won\u2019t \u201cquoted\u201d \u2018single\u2019",
    "'s 't 're 've 'm 'll 'd ''s '''",
    "It's 'quoted' and ''double'' and 'S 'Ll 'lL",
    "long s: '\u017f 'ſt \u017f's and kelvin '\u212a",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX? the-quick_brown.fox",
    "e.g. i.e. etc... U.S.A. Mr. Smith's 3rd-place finish (approx.) -- wow!!! ???",
    "I", "a", "A.", "!", "?!", "...", "----", "____", "====", "\"\"\"", "()", "[]{}<>")
# Code
add("def add(a, b):\n    \"\"\"Return the sum.\"\"\"\n    return a + b\n\n\nif __name__ == \"__main__\":\n    print(add(1, 2))\n",
    "#include <vector>\nint main() {\n\tstd::vector<int> v{1, 2, 3};\n\tfor (auto& x : v) x *= 2;\n\treturn 0;\n}\n",
    "{\"key\": [1, 2.5, -3e10, true, null], \"nested\": {\"a\": \"b\"}}",
    "x+=1;y-=2;z**=3;w//=4;a&&b||!c;p->q;r::s;t<<=1;u>>=2;v!==w;",
    "https://example.com/path/to/page?query=1&other=two#frag and mailto:someone@example.org",
    "| col1 | col2 |\n|------|------|\n| a    | b    |\n",
    "<div class=\"x\"><p>Hi &amp; bye</p></div>",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    "fn main() -> Result<(), Box<dyn Error>> { Ok(()) }",
    "    \n        \n\t\n",
    "$ ls -la /tmp | grep -v '^d' > out.txt 2>&1")
# Numbers
add("1234567890", "3.14159265358979", "1,000,000.00", "0x1F 0b1010 1e-9", "12th 21st 2nd 3rd",
    "\u0663\u0664\u0665 Arabic-Indic", "\u2460\u2461\u2462 circled", "\u216b Roman twelve", "x\u00b2 + y\u00b3 = z\u2074",
    "\uff11\uff12\uff13 full-width", "\u0967\u0968\u0969 Devanagari", "99999999999999999999999999", "-0.0 +1 1/2 50%")
# CJK and other scripts
add("\u4eca\u5929\u5929\u6c14\u5f88\u597d\uff0c\u6211\u4eec\u53bb\u516c\u56ed\u6563\u6b65\u5427\u3002",
    "\u79c1\u306f\u65e5\u672c\u8a9e\u3092\u52c9\u5f37\u3057\u3066\u3044\u307e\u3059\u3002\u30ab\u30bf\u30ab\u30ca\u3082\u3002",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8\uc785\ub2c8\ub2e4.",
    "\u4e2d\u6587English\u6df7\u5408123\u6570\u5b57",
    "\uff0c\u3002\uff01\uff1f\u3001\u300c\u300d\u300e\u300f\uff08\uff09",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645 \u0634\u064e\u0643\u0652\u0631\u064b\u0627",
    "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e04\u0e23\u0e31\u0e1a",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
    "Ti\u1ebfng Vi\u1ec7t c\u00f3 d\u1ea5u")
# Emoji
add("\U0001F600", "Great job \U0001F44D\U0001F3FD!", "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466 family",
    "\U0001F1FA\U0001F1F8\U0001F1EF\U0001F1F5 flags", "1\ufe0f\u20e3 keycap", "\u2764\ufe0f love", "\U0001F600\U0001F600\U0001F600 x3",
    "emoji\U0001F680in\U0001F525words")
# Whitespace
add("a\r\nb", "line1\n\nline2", "\t\tindented", "trailing   ", "   leading", "mixed \t \n \r\n  end  ",
    "\n", " ", "  ", "\t", "\r\n", "\r\n\r\n", "", "a  b   c    d", "a\n \nb", "x \n\n  y",
    "\u00a0nbsp\u00a0", "\u3000ideographic\u3000space", "a\u2028line\u2029sep", "\u180e mongolian \u180e!", "a\u180e!",
    "x \u180e y", "zero\u200bwidth \u200b", "\u0085NEL\u0085", "\u000b\u000cvt ff", "tab\tinside\tline\t",
    "\u2003em\u2009thin\u202fnarrow", " " * 100, " " * 37 + "x", "\n" * 20 + "end")
# Special and added tokens
add("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n",
    "<think>\n\n</think>\n\nThe answer is 42.",
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
    "<tool_response>\nsunny\n</tool_response>",
    "<|endoftext|>", "text<|endoftext|>more", "<|im_start|<|im_end|>", "<|IM_START|>", "<<|im_start|>>",
    "<|im_start|><|im_start|>", "<|fim_prefix|>def f():<|fim_suffix|>\n    return 1<|fim_middle|>",
    "<|repo_name|>q3vl<|file_sep|>main.cpp", "<|video_pad|><|vision_pad|><|box_start|>(1,2)<|box_end|><|quad_start|><|quad_end|><|object_ref_start|>cat<|object_ref_end|>",
    " <|im_end|> ", "<|im_end|>\n\n", "<|endoftext", "endoftext|>", "<|>", "<|unknown_token|>")
# Accents, combining marks, NFC
add("caf\u00e9 na\u00efve r\u00e9sum\u00e9", "cafe\u0301 nai\u0308ve", "e\u0301\u0302", "\u1e9b\u0323", "\u212b ohm \u2126",
    "A\u030a", "\u1112\u1161\u11ab\u1100\u1173\u11af", "a\u0323\u0307 a\u0307\u0323", "\u0958 \u0915\u093c", "\ufb01 ligature",
    "\u0301leading combining", "o\u0308\u0304 \u01eb\u0304", "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e\u0320\u034dA\u036b\u0357\u0334\u0362\u0335\u031c\u0330\u0354L\u0368\u0367\u0369\u0358\u0320G\u0311\u0357\u030e\u0305\u035b\u0341\u0334\u033b\u0348\u034d\u0354\u0339O\u0342\u030c\u030c\u0358\u0328\u0335\u0339\u033b\u031d\u0333",
    "\u00c5\u00e5\u00f8\u00e6 \u00df \u0130 \u0131")
# Odd and invalid-looking text
add("\ufffd replacement", "\\xff\\xfe escaped bytes", "\ufeffBOM at start", "nul\u0000inside", "bell\u0007 del\u007f",
    "\ud7ff\ue000 private \U000F0000", "\U0010FFFF max", "\uffff\ufffe nonchars", "%00%FF%e9", "&#x1F600; &amp;", "\\u00e9 \\n \\t",
    "\u0080\u0081\u009f C1 controls", "\u00ad soft hyphen", "\u200e\u200f\u202a\u202e bidi", "\u034f cgj", "\u2060wj\u2061",
    "\U0001D400\U0001D401 math bold", "\U00020000\U0002A6D6 CJK ext B")
# Long runs
add("a" * 300, "=" * 200, "1" * 64, "ab" * 150, "\u00e9" * 100, "\U0001F600" * 40, "Hello" + " " * 50 + "world" + "\t" * 10 + "!",
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis")
# Added-token flags (exercised by the tiny tokenizers: lstrip/rstrip, single_word, normalized, longest match)
add("x [SPECIAL] y", "x  \t[SPECIAL]\n\n y", "[SPECIAL][SPECIAL]", " [SPECIAL]", "a<word>b", "a <word> b", "<word>",
    "\u00e9<word>", "_<word>", "<word>_", "1<word>", "<word>\u4e2d", "cafe\u0301 caf\u00e9 CAF\u00c9",
    "<a><ab><abc><a", "hello world hello  world helloworld", "tokens<a> <ab>\u2003[SPECIAL]\u2003end")
# Unicode versions: letters/numbers new in 15.0-16.0 (Oniguruma knows them, PCRE2 10.42 does not), a 17.0
# letter (unknown to both), U+180E, and marks whose NFC reordering needs data newer than the package's 9.0
add("\U00031350's \U0002EBF0'S \U00013460'll \U000105C0're \U0001E5D0x \U00011F04\U00011F12'd \U000323AF'm",
    "\U00010D40\U00016D70\U0001CCF0 \U0001E5F1's \U00011BF0\U0001D2C0", "\U000323B0's \U00010940'll",
    "\u036e\U00011a47", "a\u0301\U00011a47\u0301", "a\U0001e94a\u036e", "\u0316\U0001e2ec", "\u1100\U00016d40")
# Random strings over many scripts, marks, spaces and tokens (seeded, so the corpus is reproducible)
rng = random.Random(20240601)
pools = [
  [chr(c) for c in range(0x20, 0x7f)] * 4,
  list(" \t\n\r\x0b\x0c\x85\xa0\u1680\u180e\u2000\u2005\u200a\u200b\u2028\u2029\u202f\u205f\u3000\ufeff"),
  [chr(c) for c in range(0x300, 0x370)],
  [chr(c) for c in range(0xc0, 0x250)],
  [chr(c) for c in range(0x4e00, 0x4e80)] + [chr(c) for c in range(0x3040, 0x30ff)] + [chr(c) for c in range(0xac00, 0xac40)],
  [chr(c) for c in range(0x1100, 0x1200)],
  [chr(c) for c in range(0x1f300, 0x1f700)] + ["\u200d", "\ufe0f", "\U0001F3FD"],
  [chr(c) for c in range(0x600, 0x700)] + [chr(c) for c in range(0x900, 0x980)] + [chr(c) for c in range(0xe00, 0xe60)],
  ["'s", "'S", "'ll", "'LL", "'\u017f", "'re", "'D", "'ve", "'m", "<|im_start|>", "<|im_end|>", "<think>", "<|image_pad|>",
   "\r\n", "  ", "\n\n", "123", "\uff14\uff15", "\u216b", "\u00b2", "\u2460", "[SPECIAL]", "<word>", "caf\u00e9", "<ab>"],
  [chr(c) for c in range(0x2000, 0x2070)] + [chr(c) for c in range(0xfb00, 0xfb50)] + ["\u212b", "\u2126", "\u212a", "\u0958", "\u1e9b"],
  [chr(c) for c in range(0x20, 0x30000) if not 0xd800 <= c < 0xe000][::97],
]
for _ in range(40):
    weights = [rng.random() for _ in pools]
    add("".join(rng.choice(rng.choices(pools, weights)[0]) for _ in range(rng.randrange(1, 60))))
# A mixed multi-paragraph document
add("# Title\n\nThis is a paragraph with **bold**, _italics_, and `code`.  It has two spaces after a period.\r\n"
    "Second line\twith a tab; third: \u4f60\u597d\u4e16\u754c \U0001F30D.\n\n"
    "- item 1\n- item 2 (\u00e9t\u00e9)\n  - nested item\n\n"
    "```python\nfor i in range(10):\n    print(i ** 2)  # squares\n```\n\n"
    "Numbers: 3.5%, $1,299.99, 2024-01-15T12:30:00Z.   \n")

# JSON with invisible, combining and NFC-unstable characters escaped.
def esc(s):
    out = []
    for ch in json.dumps(s, ensure_ascii=False)[1:-1]:
        cat = unicodedata.category(ch)
        if (cat[0] in "CM" or unicodedata.normalize("NFC", ch) != ch or 0x1100 <= ord(ch) <= 0x11FF or cat in ("Zl", "Zp") or (cat == "Zs" and ch != " ")):
            cp = ord(ch)
            if cp > 0xFFFF:
                cp -= 0x10000
                out.append("\\u%04x\\u%04x" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF)))
            else:
                out.append("\\u%04x" % cp)
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
with open("corpus.json", "w", encoding="utf-8") as f:
    f.write("[\n" + ",\n".join(" " + esc(s) for s in C) + "\n]\n")
assert json.load(open("corpus.json", encoding="utf-8")) == C
