"""The window's gather from the full cache at B = 32 (SmolLM2-135M's 3 KV heads of 64, 256
window slots from 2400 cached positions, 30 layers, fp32): advanced indexing (f1), torch.gather
(f2), one index_select over the flattened cache (f3, what KVCache.take does), and a catch-up of
16 or 64 positions. Run: python benchmarks/cpu-auto-gamma/fill_gather.py"""
import torch, time
B,H,S,D,P=32,3,2400,64,256
k=torch.randn(B,H,S,D); v=torch.randn(B,H,S,D)
dk=torch.empty(B,H,P,D); dv=torch.empty(B,H,P,D)
pos=torch.randint(0,2048,(B,P))
r=torch.arange(B)[:,None,None]; h=torch.arange(H)[None,:,None]
def f1():
    at=(r,h,pos[:,None,:]); dk[:], dv[:] = k[at], v[at]
def f2():
    idx=pos[:,None,:,None].expand(B,H,P,D)
    torch.gather(k,2,idx,out=dk); torch.gather(v,2,idx,out=dv)
for f in (f1,f2,f1,f2):
    t=time.perf_counter()
    for _ in range(30): f()
    print(f.__name__, (time.perf_counter()-t)*1e3, "ms per 30 layers")
def f3():
    flat=((torch.arange(B)[:,None,None]*H+torch.arange(H)[None,:,None])*S+pos[:,None,:]).reshape(-1)
    torch.index_select(k.view(-1,D),0,flat,out=dk.view(-1,D)); torch.index_select(v.view(-1,D),0,flat,out=dv.view(-1,D))
for kk in (16,64):
    p2=torch.randint(0,2048,(B,kk))
    def f4():
        at=(r,h,p2[:,None,:]); a,b=k[at],v[at]
        s=p2%P
        dk[r[:,:,0],:,s]=a.transpose(1,2); dv[r[:,:,0],:,s]=b.transpose(1,2)
    t=time.perf_counter()
    for _ in range(30): f4()
    print("catchup",kk,(time.perf_counter()-t)*1e3)
for f in (f3,f1,f3):
    t=time.perf_counter()
    for _ in range(30): f()
    print(f.__name__, (time.perf_counter()-t)*1e3, "ms per 30 layers")
