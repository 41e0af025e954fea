"""The authors' two networks as their code structures them, in plain PyTorch, for the tests.

Module names and registration order produce exactly the state_dict keys of
``../shared/spec/original_state_dicts.md`` (the tests assert it); the forward passes follow
``../shared/spec/models.md`` literally, in the originals' formulation: split → convs → concat,
concat[a, a·s] → 1×1, the batch folded into a grouped conv, rearrange → matmul → softmax, and the
final sigmoid of LightAWNet. Nothing here imports fastseg.
"""
import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------
# LGMSNet (U-Bench models/Hybrid/LGMSNet/LGMSNet.py)

def _conv_bn_act(c_in, c_out, k, act, bias=False, groups=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=bias, groups=groups),
                         nn.BatchNorm2d(c_out), act)


class LMS(nn.Module):
    def __init__(self, channels):
        super().__init__()
        c = channels // 4
        self.norm_act = nn.Sequential(nn.GroupNorm(4, channels), nn.GELU())
        self.local_dwc = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.global_dwc_s = nn.Conv2d(c, c, 5, padding=2, groups=c)
        self.global_dwc_m = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.global_dwc_l = nn.Conv2d(c, c, 9, padding=4, groups=c)
        self.conv_1x1_bn = _conv_bn_act(channels, c, 1, nn.SiLU())
        self.conv_nxn_bn = _conv_bn_act(c, channels, 3, nn.SiLU())

    def forward(self, x):
        x0 = x
        g0, g1, g2, g3 = torch.chunk(x, 4, dim=1)
        y = torch.cat([self.local_dwc(g0), self.global_dwc_s(g1), self.global_dwc_m(g2),
                       self.global_dwc_l(g3)], dim=1)
        y = self.norm_act(y + x0)
        y = self.conv_nxn_bn(self.conv_1x1_bn(y))
        return y + x0


class ConvSplit(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.dwconv3x3 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.dwconv1x1 = nn.Conv2d(channels, channels, 1, groups=channels, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return x + self.bn2(self.dwconv1x1(self.relu(self.bn1(self.dwconv3x3(x)))))


class Attention(nn.Module):
    def __init__(self, dim, heads=4, dim_head=8):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.attend = nn.Softmax(dim=-1)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x):  # [b, p, n, d]: p parity groups of n tokens
        b, p, n, _ = x.shape
        q, k, v = self.to_qkv(self.norm(x)).chunk(3, dim=-1)
        # rearrange 'b p n (h d) -> b p h n d'
        q, k, v = (t.reshape(b, p, n, self.heads, self.dim_head).transpose(2, 3) for t in (q, k, v))
        attn = self.attend(torch.matmul(q, k.transpose(-1, -2)) * self.scale)
        out = torch.matmul(attn, v).transpose(2, 3).reshape(b, p, n, -1)
        return self.to_out(out)


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(),
                                 nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0))

    def forward(self, x):
        return self.net(x)


class Transformer(nn.Module):
    def __init__(self, dim, mlp_dim):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleList([Attention(dim), FeedForward(dim, mlp_dim)])])

    def forward(self, x):
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


class GMS(nn.Module):
    def __init__(self, c_in, channels, split, mlp_dim):
        super().__init__()
        self.split = split
        self.conv1 = _conv_bn_act(c_in, channels, 3, nn.SiLU())
        self.conv2 = _conv_bn_act(channels, channels, 1, nn.SiLU())
        self.conv_spilt = ConvSplit(split[1])
        self.transformer = Transformer(split[0], mlp_dim)
        self.conv3 = _conv_bn_act(channels, channels, 1, nn.SiLU())
        self.conv4 = _conv_bn_act(c_in + channels, channels, 3, nn.SiLU())

    def forward(self, x):
        y0 = x
        h = self.conv2(self.conv1(x))
        t, c = torch.split(h, self.split, dim=1)
        c = self.conv_spilt(c)
        b, d, H, W = t.shape
        # rearrange 'b d (h ph) (w pw) -> b (ph pw) (h w) d' with ph = pw = 2, and back
        t = t.reshape(b, d, H // 2, 2, W // 2, 2).permute(0, 3, 5, 2, 4, 1).reshape(b, 4, -1, d)
        t = self.transformer(t)
        t = t.reshape(b, 2, 2, H // 2, W // 2, d).permute(0, 5, 3, 1, 4, 2).reshape(b, d, H, W)
        h = self.conv3(torch.cat([t, c], dim=1))
        return self.conv4(torch.cat([h, y0], dim=1))


class Up(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out),
                                nn.ReLU())

    def forward(self, x):
        return self.up(x)


class Fusion(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, padding=1, groups=2), nn.GELU(), nn.BatchNorm2d(c_in),
            nn.Conv2d(c_in, 4 * c_out, 1), nn.GELU(), nn.BatchNorm2d(4 * c_out),
            nn.Conv2d(4 * c_out, c_out, 1), nn.GELU(), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return self.conv(x)


class Stem(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = _conv_bn_act(c_in, c_out, 3, nn.ReLU(), bias=True)

    def forward(self, x):
        return self.conv(x)


class OriginalLGMSNet(nn.Module):
    def __init__(self, in_channels=3, num_classes=1):
        super().__init__()
        self.stem = Stem(in_channels, 16)
        self.encoder1 = nn.Sequential(LMS(16), _conv_bn_act(16, 16, 1, nn.SiLU()))
        self.encoder2 = nn.Sequential(LMS(16), _conv_bn_act(16, 32, 1, nn.SiLU()))
        self.encoder3 = nn.Sequential(LMS(32), _conv_bn_act(32, 64, 1, nn.SiLU()))
        self.encoder4 = nn.Sequential(GMS(64, 128, [96, 32], 256))
        self.encoder5 = nn.Sequential(GMS(128, 128, [96, 32], 256))
        self.Up5 = Up(128, 128)
        self.Up_conv5 = GMS(256, 128, [96, 32], 256)
        self.Up4 = Up(128, 64)
        self.Up_conv4 = nn.Sequential(Fusion(128, 64), GMS(64, 64, [48, 16], 128))
        self.Up3 = Up(64, 32)
        self.Up_conv3 = Fusion(64, 32)
        self.Up2 = Up(32, 16)
        self.Up_conv2 = Fusion(32, 16)
        self.Conv_1x1 = nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        pool = F.max_pool2d
        x1 = self.encoder1(self.stem(x))
        x2 = self.encoder2(pool(x1, 2))
        x3 = self.encoder3(pool(x2, 2))
        x4 = self.encoder4(pool(x3, 2))
        x5 = self.encoder5(pool(x4, 2))
        d5 = self.Up_conv5(torch.cat([x4, self.Up5(x5)], dim=1))
        d4 = self.Up_conv4(torch.cat([x3, self.Up4(d5)], dim=1))
        d3 = self.Up_conv3(torch.cat([x2, self.Up3(d4)], dim=1))
        d2 = self.Up_conv2(torch.cat([x1, self.Up2(d3)], dim=1))
        return self.Conv_1x1(d2)


# ---------------------------------------------------------------------------------------------
# LightAWNet (archive lightawnet/models/LightAWNet.py)

class RoutingAttention(nn.Module):
    def __init__(self, c_in, experts):
        super().__init__()
        self.net = nn.Conv2d(c_in, experts, 1)

    def forward(self, x):
        return torch.sigmoid(self.net(F.adaptive_avg_pool2d(x, 1))).flatten(1)  # [N, K]


class DynamicConv(nn.Module):
    """CondConv with the batch folded into the groups of one conv, then BN (eps 1e-6)."""

    def __init__(self, c_in, c_out, experts=4, k=3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, c_out, c_in, k, k))
        self.attention = RoutingAttention(c_in, experts)
        self.norm = nn.BatchNorm2d(c_out, eps=1e-6)

    def forward(self, x):
        N, C, H, W = x.shape
        K, c_out = self.weight.shape[:2]
        alpha = self.attention(x)
        kernels = torch.mm(alpha, self.weight.view(K, -1))  # every sample's mixed kernel
        kernels = kernels.view(N * c_out, C, *self.weight.shape[3:])
        y = F.conv2d(x.reshape(1, N * C, H, W), kernels, padding=1, groups=N)
        return self.norm(y.view(N, c_out, H, W))


class Block(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.dwconv = nn.Conv2d(c_in, c_in, 7, padding=3, groups=c_in)
        self.conv1_1 = nn.Sequential(nn.Conv2d(c_in, 4 * c_in, 1), nn.BatchNorm2d(4 * c_in),
                                     nn.LeakyReLU())
        self.conv1_2 = nn.Sequential(nn.Conv2d(4 * c_in, 1, 1), nn.Sigmoid())
        self.down = nn.Conv2d(8 * c_in, c_in, 1)
        self.weight = DynamicConv(c_in, c_out)

    def forward(self, x):
        a = self.conv1_1(self.dwconv(x))
        s = self.conv1_2(a)
        h = self.down(torch.cat([a, a * s], dim=1)) + x
        return self.weight(h)


class SelfAttention(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))
        self.query = nn.Conv2d(channels, channels // 8, 1)
        self.key = nn.Conv2d(channels, channels // 8, 1)
        self.value = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        N, C, H, W = x.shape
        q = self.query(x).view(N, -1, H * W).permute(0, 2, 1)       # [N, HW, C/8]
        k = self.key(x).view(N, -1, H * W)                           # [N, C/8, HW]
        attn = torch.softmax(torch.bmm(q, k), dim=-1)                # no 1/√d
        v = self.value(x).view(N, C, H * W)
        out = torch.bmm(v, attn.permute(0, 2, 1)).view(N, C, H, W)
        return self.gamma * out + x


class De(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.up = nn.Sequential(nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out), nn.LeakyReLU(),
                                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
        self.att = nn.Sequential(nn.Linear(c_out, c_out // 8, bias=False), nn.ReLU(),
                                 nn.Linear(c_out // 8, c_out, bias=False), nn.Sigmoid())
        self.weight = DynamicConv(c_out, c_out)

    def forward(self, x, skip):
        z = self.up(x)
        w = self.att(z.mean((2, 3)))[:, :, None, None]
        return self.weight(z * w + skip)


class OriginalLightAWNet(nn.Module):
    def __init__(self, in_channels=1, num_classes=1):
        super().__init__()
        self.layer1 = Block(in_channels, 16)
        self.layer2 = Block(16, 32)
        self.layer3 = Block(32, 64)
        self.mul4 = Block(64, 128)
        self.mul5 = Block(128, 256)
        self.attention = SelfAttention(256)
        self.De1 = De(256, 128)
        self.De2 = De(128, 64)
        self.De3 = De(64, 32)
        self.De4 = De(32, 16)
        self.output = DynamicConv(16, num_classes)
        self.conv1_1 = nn.Conv2d(64, 128, 1)
        self.conv1_2 = nn.Conv2d(128, 256, 1)
        self.downconv = nn.Conv2d(256, 128, 1)

    def forward(self, x):
        pool = nn.MaxPool2d(2)

        def resize(t, like):
            return F.interpolate(t, size=like.shape[-2:], mode="bilinear", align_corners=True)

        x1 = self.layer1(x)
        x2 = self.layer2(pool(x1))
        x3 = self.layer3(pool(x2))
        x3d = pool(x3)
        a4 = self.mul4(x3d)
        b4 = self.conv1_1(x3d)
        a4p = pool(a4)
        a4g = a4p * torch.sigmoid(resize(b4, a4p))
        b4g = torch.sigmoid(a4) * b4
        b5 = self.conv1_2(b4g)
        a5 = self.mul5(a4g)
        c = self.attention(a5 * torch.sigmoid(resize(b5, a5)))
        s4 = self.downconv(b5 * torch.sigmoid(resize(a5, b5)))
        d = self.De1(c, s4)
        d = self.De2(d, x3)
        d = self.De3(d, x2)
        d = self.De4(d, x1)
        return torch.sigmoid(self.output(d))
