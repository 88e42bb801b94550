import sys, torch
from flurka_rewrite.kernels.feature_maps import build_feature_map
from flurka_rewrite.kernels.reference import attention_core
from flurka_rewrite.kernels.triton_ops import triton_attention_core
fmap, dtype, causal = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3] == "1"
torch.manual_seed(0)
B,H,Hkv,N,M,dh,dv = 2,4,2,37,23,20,23
M = N if causal else M
q=torch.randn(B,H,N,dh,device="cuda",dtype=dtype,requires_grad=True); k=torch.randn(B,Hkv,M,dh,device="cuda",dtype=dtype,requires_grad=True); v=torch.randn(B,Hkv,M,dv,device="cuda",dtype=dtype,requires_grad=True)
mask=(torch.rand(B,M,device="cuda")>0.3); mask[:, -1]=True
fm=build_feature_map(fmap, head_dim=dh, kv_heads=Hkv, num_features=40).cuda()
o=triton_attention_core(q,k,v,feature_map=fm,key_padding_mask=mask,causal=causal); torch.cuda.synchronize(); print("fwd ok", flush=True)
o.sum().backward(); torch.cuda.synchronize(); print("bwd ok", flush=True)
r=attention_core(q.float(),k.float(),v.float(),feature_map=fm,key_padding_mask=mask,causal=causal)
print(fmap, dtype, causal, ((o.float()-r).norm()/r.norm()).item())
